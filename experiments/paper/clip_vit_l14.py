"""CLIP ViT-L/14 at 224 px (Radford et al. 2021): the paper's largest ViT at its base resolution.

Towers: ``models.clip.PRESETS["vit_l14"]`` (vision 1024 wide × 24 layers, 16 heads, patch 14;
text 768 × 12, 12 heads; joint embedding 768; OpenAI BPE, vocab 49408, 77 tokens).
Optimisation from the CLIP paper's Table 20 (ViT-L/14): batch 32768, lr 4e-4, weight decay 0.2,
Adam β2 0.98, ε 1e-6, 2000 warm-up steps, cosine decay; 32 epochs of 400M pairs ≈ 390k steps.
Paper size for comparison: 427.6M parameters (open_clip's model profile of the OpenAI weights;
the CLIP paper itself gives no parameter count).

Sharding: FSDP over 16 devices, data parallel across the rest (the model is small enough that
tensor parallelism only adds collectives); activations rematerialised keeping matmul outputs.
"""

import dataclasses

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.clip import PRESETS


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="paper_clip_vit_l14",
        task="clip",
        model=dataclasses.replace(PRESETS["vit_l14"], dtype="bfloat16", scan_layers=True,
                                  remat="dots_saveable"),
        data=DataConfig(name="image_captions/laion", image_size=224, random_crop=True,
                        vocab_size=49408, context_length=77, num_workers=16),
        optim=OptimConfig(learning_rate=4e-4, warmup_steps=2000, b1=0.9, b2=0.98, eps=1e-6,
                          weight_decay=0.2, grad_clip=0.0),
        train=TrainConfig(batch_size=32768, steps=390_000, log_every=100, eval_every=10_000,
                          ckpt_every=2000, keep_checkpoints=3, ema_decay=0.0),
        mesh=MeshConfig(data=-1, fsdp=16, model=1, preset="fsdp"),
    )
