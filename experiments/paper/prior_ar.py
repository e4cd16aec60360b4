"""unCLIP's autoregressive prior at paper scale (Ramesh et al. 2022, §2.1 and Table 3).

The CLIP image embedding is reduced by PCA to 319 of its 1024 dimensions, each coefficient
quantised into 1024 buckets, and predicted code by code after the caption, the CLIP text
embedding and a quantised text–image similarity token.
Paper figures (Table 3, "AR prior"): ~1B parameters; a text-encoder Transformer (width 2048,
24 blocks) feeding a causal "latent decoder" Transformer (width 1664, 24 blocks, 26 heads of
64); batch 4096, 1M iterations, lr 1.6e-4, Adam β2 0.91, ε 1e-10, weight decay 4.0e-2, EMA
0.999. (Recalled from the paper's Table 3; the widths were not re-checked against the PDF.)

Assumptions: ours has no separate text encoder — the causal stack reads the frozen CLIP's text
states (1024 wide, 77 tokens) through a linear projection as a prefix — so the paper's two
stacks become one. We use the paper's latent-decoder width 1664 but with 30 blocks so that the
single stack carries the ~1B parameters the paper reports (30 blocks: 12 · 30 · 1664² = 1.00B;
the paper's 24 would give 0.80B).

Sharding: FSDP over 8 × tensor parallel over 2 (26 heads are divisible by 2, not by 4); data
parallel across the rest; sequence 77 + 2 + 319 = 398 tokens, full remat of each block.
"""

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.prior_ar import ARPriorConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="paper_prior_ar",
        task="prior_ar",
        model=ARPriorConfig(embeddings_dir="runs/paper/embeddings", embed_dim=1024,
                            text_length=77, text_width=1024, pca_dims=319, num_buckets=1024,
                            quantization="uniform", sim_buckets=16, sim_percentile=50.0,
                            width=1664, depth=30, num_heads=26, mlp_ratio=4.0, act="gelu",
                            dtype="bfloat16", scan_layers=True, remat="full",
                            caption_dropout=0.1),
        data=DataConfig(name="image_captions/laion", image_size=256, vocab_size=49408,
                        context_length=77),
        optim=OptimConfig(learning_rate=1.6e-4, warmup_steps=10_000, b1=0.9, b2=0.91,
                          eps=1e-10, weight_decay=4.0e-2, grad_clip=1.0),
        train=TrainConfig(batch_size=4096, steps=1_000_000, log_every=100, eval_every=10_000,
                          ckpt_every=2000, ema_decay=0.999),
        mesh=MeshConfig(data=-1, fsdp=8, model=2, preset="fsdp_tp"),
    )
