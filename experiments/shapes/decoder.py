"""unCLIP decoder on 32 px captioned shapes, conditioned on the demo CLIP (CPU scale, ~6 min).

CLIP-embedding conditioning only (``text_layers=0``: the optional caption encoder is off, as the
shapes captions add little over the CLIP embedding at this scale; set ``model.text_layers=2`` to
train GLIDE's caption pathway too). Learned σ with the hybrid loss; cosine schedule.
"""

from unclip_jax.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.models.decoder import DecoderConfig
from unclip_jax.sharding import MeshConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="shapes_decoder",
        task="decoder",
        model=DecoderConfig(
            clip_workdir="runs/demo/clip", base_channels=32, channel_mult=(1, 2, 2),
            num_res_blocks=1, attention_resolutions=(8,), head_channels=32,
            resblock_updown=True, num_clip_tokens=4, context_dim=64, text_layers=0,
            clip_drop_prob=0.1, text_drop_prob=0.5, schedule="cosine", num_timesteps=1000,
            model_output="eps", learned_variance=True, sample_steps=50, guidance_scale=3.0),
        data=DataConfig(name="captioned_shapes/r32", image_size=32, vocab_size=256,
                        context_length=24, tokenizer="runs/demo/tokenizer.model"),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, weight_decay=0.0,
                          b2=0.99, grad_clip=1.0),
        train=TrainConfig(batch_size=32, steps=1500, log_every=50, eval_every=0,
                          ckpt_every=500, ema_decay=0.995),
        mesh=MeshConfig(data=-1, fsdp=1, model=1),
    )
