"""AR prior (unCLIP §2.2) on the shapes CLIP's cached embeddings (CPU scale, ~5 min on a loaded
2-core CPU).

Needs the embedding cache: ``unclip-jax embed --clip runs/demo/clip --split train --out
runs/demo/embeddings`` (and ``--split validation`` for the evaluation).

Sizes (chosen for a loaded 2-core CPU; measured on the demo CLIP's cache, E = 64):

* ``pca_dims`` 16: the top 16 of 64 principal components hold 99.3% of the training image
  embeddings' variance (top 24: 99.7%); 16 codes → sequence 24 + 2 + 16 = 42 instead of 50.
* ``num_buckets`` 64 (uniform): decoding the test images' own codes back gives cos 0.9966 to
  the true embedding (256 buckets: 0.9968), so the coarser vocabulary costs nothing visible
  while the softmax has 4× fewer classes to learn.
* The paper's mechanics are kept: PCA + per-coefficient quantization, codes in order of
  decreasing variance, similarity token sampled at the 50th percentile of the training
  text–image similarities, 10% caption dropout.
"""

from unclip_jax.core.config import ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.prior_ar import ARPriorConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="shapes_prior_ar",
        task="prior_ar",
        model=ARPriorConfig(embeddings_dir="runs/demo/embeddings", pca_dims=16,
                            num_buckets=64, quantization="uniform", sim_buckets=16,
                            sim_percentile=50.0, width=64, depth=3, num_heads=4,
                            caption_dropout=0.1),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=100, weight_decay=0.05),
        train=TrainConfig(batch_size=64, steps=3000, log_every=250, eval_every=0,
                          ckpt_every=3000, ema_decay=0.0),
        mesh=MeshConfig(data=-1, fsdp=1, model=1),
    )
