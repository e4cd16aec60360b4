"""The DALL·E 12B transformer (Ramesh et al. 2021, §2.2 and appendix B.1).

Paper: 12 billion parameters; 64 self-attention layers, width 3968, 62 heads of 64; a stream of
256 BPE text tokens (vocabulary 16384) then 32 × 32 = 1024 image codes (vocabulary 8192) of the
dVAE; row attention except every fourth layer column attention, the last layer a convolutional
(11 × 11) mask; per-position padding tokens; loss 1/8 text + 7/8 image; batch 1024, 430k
updates, lr 4.5e-4, Adam β1 0.9, β2 0.96, ε 1e-8, weight decay 4.5e-2, gradient clip 4.

Assumptions: float32 master weights with bfloat16 compute (the paper used 16-bit weights with
per-resblock gradient scaling); no EMA.

Sharding: FSDP over 32 × tensor parallel over 2 (62 heads divide by 2 only; the MLP hidden
15872 divides by both), data parallel across the rest; each block fully rematerialised
(1279 tokens × 3968 per example).
"""

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.dalle import DalleConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="paper_dalle",
        task="dalle",
        model=DalleConfig(text_vocab_size=16384, image_vocab_size=8192, text_length=256,
                          grid_size=32, pad_id=0, width=3968, depth=64, num_heads=62,
                          mlp_ratio=4.0, act="gelu", attention="paper", conv_kernel=11,
                          dtype="bfloat16", scan_layers=True, remat="full",
                          caption_dropout=0.1, text_loss_weight=1 / 8,
                          dvae_workdir="runs/paper/dvae", clip_workdir="runs/paper/clip_vit_l14"),
        data=DataConfig(name="image_captions/laion", image_size=256, vocab_size=16384,
                        context_length=256, num_workers=16),
        optim=OptimConfig(learning_rate=4.5e-4, warmup_steps=5000, b1=0.9, b2=0.96, eps=1e-8,
                          weight_decay=4.5e-2, grad_clip=4.0),
        train=TrainConfig(batch_size=1024, steps=430_000, log_every=100, eval_every=10_000,
                          ckpt_every=1000, ema_decay=0.0),
        mesh=MeshConfig(data=-1, fsdp=32, model=2, preset="fsdp_tp"),
    )
