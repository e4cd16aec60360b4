"""unCLIP diffusion prior on the demo CLIP's embeddings of 32 px shapes (CPU scale, ~minutes).

Needs a trained CLIP (``model.clip_workdir``); the embedding cache (``model.embeddings_dir``) is
built from it on first use. Train with
``unclip-jax train experiments/shapes/prior.py --workdir runs/demo/prior``.
"""

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.prior import PriorConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="shapes_prior",
        task="prior",
        model=PriorConfig(width=64, depth=3, num_heads=4, cond_drop_prob=0.1,
                          normalization="scale", embed_scale=0.0, sample_steps=64,
                          guidance_scale=1.0, num_candidates=2, dtype="float32",
                          clip_workdir="runs/demo/clip", embeddings_dir="runs/demo/embeddings"),
        data=DataConfig(name="captioned_shapes/r32", image_size=32, context_length=24),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, weight_decay=0.05),
        train=TrainConfig(batch_size=64, steps=2000, log_every=250, eval_every=0,
                          ckpt_every=1000, ema_decay=0.995),
        mesh=MeshConfig(data=-1, fsdp=1, model=1),
    )
