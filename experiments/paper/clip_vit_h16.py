"""unCLIP's CLIP: ViT-H/16 at 256 px (Ramesh et al. 2022, §2 and appendix C).

"For the CLIP image encoder we use a ViT-H/16 … that consumes 256×256 resolution images and has
width 1280 with 32 Transformer blocks; the text encoder is a Transformer with a causal attention
mask, width 1024 and 24 Transformer blocks" — ``models.clip.PRESETS["vit_h16_unclip"]`` (joint
embedding 1024, 16 heads per tower, vocab 49408, 77 tokens).
The unCLIP paper gives no parameter count for it. The closest published figure is open_clip's
ViT-H-14 (same towers at 224 px: 256 patches, a 14-px patch embedding instead of 16-px):
986.1M parameters; our ViT-H/16 differs from it only by the patch embedding (+0.23M).
Optimisation follows the CLIP recipe (batch 32768, lr 4e-4 scaled down to 2e-4 for the larger
model, weight decay 0.2, β2 0.98); the paper does not state it for this encoder.

Sharding: FSDP over 32 devices (params + AdamW + no EMA ≈ 16 GB before sharding), data parallel
across the rest; full rematerialisation of each block (257 tokens × width 1280 per image).
"""

import dataclasses

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.clip import PRESETS


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="paper_clip_vit_h16",
        task="clip",
        model=dataclasses.replace(PRESETS["vit_h16_unclip"], dtype="bfloat16", scan_layers=True,
                                  remat="full"),
        data=DataConfig(name="image_captions/laion", image_size=256, random_crop=True,
                        vocab_size=49408, context_length=77, num_workers=16),
        optim=OptimConfig(learning_rate=2e-4, warmup_steps=2000, b1=0.9, b2=0.98, eps=1e-6,
                          weight_decay=0.2, grad_clip=0.0),
        train=TrainConfig(batch_size=32768, steps=390_000, log_every=100, eval_every=10_000,
                          ckpt_every=2000, keep_checkpoints=3, ema_decay=0.0),
        mesh=MeshConfig(data=-1, fsdp=32, model=1, preset="fsdp"),
    )
