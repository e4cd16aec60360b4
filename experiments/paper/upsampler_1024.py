"""unCLIP's second upsampler, 256 → 1024 px, at paper scale (Ramesh et al. 2022, §2.1, Table 3).

Paper: ~300M parameters, 192 model channels, 2 residual blocks per level, channel multipliers
(1, 1, 2, 2, 4, 4), no attention, trained on random crops a quarter of the target side (256×256
crops), BSR-style degradation as conditioning augmentation, 1000 cosine steps, 27 sampling
steps, batch 512, 1M iterations, lr 1.0e-4, Adam β2 0.999, ε 1e-8, EMA 0.9999.

Sharding: FSDP over 8 devices, data parallel across the rest (the model is small; the
activations of 256×256 crops at 192 channels dominate, see ``unclip-jax describe``).
"""

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.decoder import UpsamplerConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="paper_upsampler_1024",
        task="upsampler",
        model=UpsamplerConfig(
            image_size=1024, low_res_size=256, base_channels=192,
            channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, dropout=0.0,
            resblock_updown=True, augment="bsr", crop_fraction=0.25, schedule="cosine",
            num_timesteps=1000, model_output="eps", learned_variance=False, sample_steps=27,
            dtype="bfloat16"),
        data=DataConfig(name="image_captions/laion", image_size=1024, num_workers=16),
        optim=OptimConfig(learning_rate=1.0e-4, warmup_steps=10_000, b1=0.9, b2=0.999,
                          eps=1e-8, weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(batch_size=512, steps=1_000_000, log_every=100, eval_every=10_000,
                          ckpt_every=2000, ema_decay=0.9999),
        mesh=MeshConfig(data=-1, fsdp=8, model=1, preset="fsdp"),
    )
