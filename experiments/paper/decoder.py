"""unCLIP's 64×64 decoder at paper scale: GLIDE's 3.5B text-conditional U-Net plus CLIP
conditioning (Ramesh et al. 2022, §2.1 and Table 3; Nichol et al. 2021, GLIDE §4).

Sources: GLIDE — "ADM architecture … 64×64 resolution, 512 model channels … 2.3 billion
parameters for the visual part", a 24-block, 2048-wide Transformer text encoder "1.2 billion
parameters", its final token states projected into every attention layer; unCLIP Table 3
(64×64 decoder) — 3.5B parameters, 512 channels, 3 residual blocks per level, channel
multipliers (1, 2, 3, 4), attention at 32, 16 and 8 px with 64 channels per head, text context
256 tokens, dropout 0.1, 1000 cosine steps with learned Σ, batch 2048, 800k iterations, lr
1.2e-4, Adam β2 0.999, ε 1e-8, EMA 0.9999. unCLIP adds the CLIP image embedding (ViT-H/16,
E = 1024) to the timestep embedding and as four extra context tokens.

Assumptions: the caption tokenizer has 50257 ids (GLIDE's GPT-2 BPE; unCLIP does not say); text
heads 32 of 64 channels (GLIDE: not stated); clip_dim = 1024 from the ViT-H/16.

Sharding: FSDP over 32 devices (conv kernels shard over their input channels), data parallel
across the rest; the U-Net has no tensor-parallel layout worth its collectives at 512 channels.
"""

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.decoder import DecoderConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="paper_decoder",
        task="decoder",
        model=DecoderConfig(
            image_size=64, clip_workdir="runs/paper/clip_vit_h16", clip_dim=1024,
            clip_image_size=256, base_channels=512, channel_mult=(1, 2, 3, 4),
            num_res_blocks=3, attention_resolutions=(32, 16, 8), head_channels=64,
            dropout=0.1, resblock_updown=True, num_clip_tokens=4, context_dim=2048,
            text_layers=24, text_width=2048, text_heads=32, vocab_size=50257,
            context_length=256, pad_id=0, clip_drop_prob=0.1, text_drop_prob=0.5,
            schedule="cosine", num_timesteps=1000, model_output="eps", learned_variance=True,
            sample_steps=250, guidance_scale=3.0, dtype="bfloat16"),
        data=DataConfig(name="image_captions/laion", image_size=64, vocab_size=50257,
                        context_length=256, num_workers=16),
        optim=OptimConfig(learning_rate=1.2e-4, warmup_steps=10_000, b1=0.9, b2=0.999,
                          eps=1e-8, weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(batch_size=2048, steps=800_000, log_every=100, eval_every=10_000,
                          ckpt_every=2000, ema_decay=0.9999),
        mesh=MeshConfig(data=-1, fsdp=32, model=1, preset="fsdp"),
    )
