"""The DALL·E dVAE (Ramesh et al. 2021, §2.1 and appendix A): 256 px → 32 × 32 codes of 8192.

Architecture: ``models.dvae.PRESETS["dalle"]`` — the released dVAE's shape (4 groups of 2
residual blocks, 256 hidden channels doubling per group in the encoder, 128 channels after the
decoder's first 1×1 conv). Objective (appendix A.2): logit-Laplace likelihood with ε 0.1; τ
annealed 1 → 1/16 over the first 150k updates (cosine), the KL weight β ramped 0 → 6.6 over
the first 5000; batch 512, 3M updates, lr 1e-4 annealed to 1.25e-6, Adam β1 0.9, β2 0.999, ε
1e-8, weight decay 1e-4. The paper states no parameter count.

Sharding: data parallel with FSDP over 4 (the model is ~100M; the 256 px feature maps at up to
2048 channels dominate memory).
"""

import dataclasses

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.dvae import PRESETS


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="paper_dvae",
        task="dvae",
        model=dataclasses.replace(PRESETS["dalle"], dtype="bfloat16"),
        data=DataConfig(name="image_captions/laion", image_size=256, num_workers=16),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, end_lr_factor=0.0125,
                          b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, grad_clip=0.0),
        train=TrainConfig(batch_size=512, steps=3_000_000, log_every=100, eval_every=10_000,
                          ckpt_every=2000, ema_decay=0.0),
        mesh=MeshConfig(data=-1, fsdp=4, model=1, preset="fsdp"),
    )
