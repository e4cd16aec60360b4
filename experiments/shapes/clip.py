"""Tiny CLIP on 32 px captioned shapes: the demo's first model (CPU scale, ~minutes).

``vision_colour_blocks=1``: the first two ViT blocks see a colour-blind image and colour
joins before the third. With colour from the first block the tower learns shape *through* colour
("red and pointy" is a diamond in every training image, since red triangles are held out) and
zero-shot shape accuracy on held-out colour-shape pairs stays near 0.78; with late colour it
is above 0.9 (experiments/RESULTS.md).
"""

from unclip_jax.core.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.clip import CLIPConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="shapes_clip",
        task="clip",
        model=CLIPConfig(embed_dim=64, patch_size=8, vision_width=64, vision_layers=3,
                         vision_heads=4, vision_colour_blocks=1, text_width=64, text_layers=3,
                         text_heads=4,
                         act="quick_gelu", dtype="float32"),
        data=DataConfig(name="captioned_shapes/r32", image_size=32, vocab_size=256,
                        context_length=24, num_workers=2),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=100, weight_decay=0.05),
        train=TrainConfig(batch_size=128, steps=2000, log_every=100, eval_every=1000,
                          ckpt_every=500, ema_decay=0.0),
        mesh=MeshConfig(data=-1, fsdp=1, model=1),
    )
