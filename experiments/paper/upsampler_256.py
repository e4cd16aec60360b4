"""unCLIP's first upsampler, 64 → 256 px, at paper scale (Ramesh et al. 2022, §2.1, Table 3).

Paper: ~700M parameters, 320 model channels, 3 residual blocks per level, channel multipliers
(1, 2, 3, 4), no attention (convolutions only, so it runs on any size), trained on random crops
a quarter of the target side (64×64 crops), Gaussian-blur conditioning augmentation, dropout
0.1, 1000 cosine steps, 27 sampling steps, batch 1024, 1M iterations, lr 1.2e-4, Adam β2 0.999,
ε 1e-8, EMA 0.9999. The noisy image and the bilinearly upsampled low-res image are
concatenated on channels (GLIDE's upsampler recipe).

Sharding: FSDP over 16 devices, data parallel across the rest.
"""

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.decoder import UpsamplerConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="paper_upsampler_256",
        task="upsampler",
        model=UpsamplerConfig(
            image_size=256, low_res_size=64, base_channels=320, channel_mult=(1, 2, 3, 4),
            num_res_blocks=3, dropout=0.1, resblock_updown=True, augment="blur",
            blur_sigma=(0.4, 0.6), crop_fraction=0.25, schedule="cosine", num_timesteps=1000,
            model_output="eps", learned_variance=False, sample_steps=27, dtype="bfloat16"),
        data=DataConfig(name="image_captions/laion", image_size=256, num_workers=16),
        optim=OptimConfig(learning_rate=1.2e-4, warmup_steps=10_000, b1=0.9, b2=0.999,
                          eps=1e-8, weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(batch_size=1024, steps=1_000_000, log_every=100, eval_every=10_000,
                          ckpt_every=2000, ema_decay=0.9999),
        mesh=MeshConfig(data=-1, fsdp=16, model=1, preset="fsdp"),
    )
