"""AR prior (unCLIP §2.2) on the shapes CLIP's cached embeddings (CPU scale, a few minutes).

Needs the embedding cache: ``unclip-jax embed --clip runs/demo/clip --split train --out
runs/demo/embeddings`` (and ``--split validation`` for the evaluation).
"""

from unclip_jax.config import ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.models.prior_ar import ARPriorConfig
from unclip_jax.sharding import MeshConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="shapes_prior_ar",
        task="prior_ar",
        model=ARPriorConfig(embeddings_dir="runs/demo/embeddings", pca_dims=24,
                            num_buckets=256, quantization="uniform", sim_buckets=16,
                            sim_percentile=50.0, width=128, depth=4, num_heads=4,
                            caption_dropout=0.1),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, weight_decay=0.05),
        train=TrainConfig(batch_size=128, steps=1500, log_every=100, eval_every=500,
                          ckpt_every=500, ema_decay=0.0),
        mesh=MeshConfig(data=-1, fsdp=1, model=1),
    )
