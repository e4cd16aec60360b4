"""Tiny random-init unCLIP runs written to disk in the layout of `make demo` (config.json and
one checkpoint per run, a sentencepiece tokenizer): what the notebook and command tests load
with ``load_unclip`` / the ``--clip --prior --decoder --upsampler`` flags."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import config as config_lib
from unclip_jax import sharding, shapes
from unclip_jax.models import decoder as D
from unclip_jax.models import prior as P
from unclip_jax.models.clip import CLIP, CLIPConfig
from unclip_jax.text import EOS_ID, PAD_ID, Tokenizer
from unclip_jax.train.checkpoint import Checkpointer

E, L = 8, 12
CLIP_CFG = CLIPConfig(embed_dim=E, image_size=8, patch_size=4, vision_width=16,
                      vision_layers=1, vision_heads=2, vocab_size=64, context_length=L,
                      text_width=16, text_layers=1, text_heads=2, eos_id=EOS_ID, pad_id=PAD_ID)
PRIOR_CFG = P.PriorConfig(embed_dim=E, text_width=16, context_length=L, width=16, depth=1,
                          num_heads=2, num_timesteps=100, sample_steps=3, num_candidates=2,
                          guidance_scale=2.0)
DEC_CFG = D.DecoderConfig(image_size=8, clip_dim=E, clip_image_size=8, base_channels=8,
                          channel_mult=(1,), num_res_blocks=1, attention_resolutions=(8,),
                          head_channels=8, num_timesteps=100, sample_steps=3)
UPS_CFG = D.UpsamplerConfig(image_size=16, low_res_size=8, base_channels=8, channel_mult=(1,),
                            num_res_blocks=1, num_timesteps=100, sample_steps=2)


def random_params(abstract, seed, std=0.2):
    """Params drawn N(0, std²) (norm scales around 1), so no output layer is all zeros."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((1.0 if "scale" in str(path[-1]) else 0.0)
                                    + std * rng.normal(size=s.shape), jnp.float32),
        sharding.strip_boxes(abstract)["params"])


def write_run(workdir: Path, model_cfg, params) -> None:
    """A training run's on-disk layout: config.json and one complete checkpoint (no EMA)."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(
        {"model": config_lib.to_dict(model_cfg), "train": {"ema_decay": 0.0}}))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(1, {"params": params}, {"position": 0}, {})
    ckpt.close()


def write_tiny_unclip(root: Path) -> Path:
    """``root/{tokenizer.model, clip, prior, decoder, upsampler}``: a 16 px chain."""
    root = Path(root)
    caps = [shapes.caption(shapes.sample_scene(0, i)) for i in range(200)]
    Tokenizer.train(caps, root / "tokenizer.model", 60)
    cond = {"text_emb": jnp.zeros((1, E)), "text_states": jnp.zeros((1, L, 16)),
            "text_mask": jnp.ones((1, L), bool)}
    write_run(root / "clip", CLIP_CFG, random_params(jax.eval_shape(lambda: CLIP(CLIP_CFG).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, L), jnp.int32))), 0))
    write_run(root / "prior", PRIOR_CFG, random_params(jax.eval_shape(
        lambda: P.DiffusionPrior(PRIOR_CFG).init(jax.random.PRNGKey(1), jnp.zeros((1, E)),
                                                 jnp.zeros((1,), jnp.int32), cond)), 1))
    write_run(root / "decoder", DEC_CFG, random_params(jax.eval_shape(
        lambda: D.init_decoder(DEC_CFG, jax.random.PRNGKey(2))), 2))
    write_run(root / "upsampler", UPS_CFG, random_params(jax.eval_shape(
        lambda: D.init_upsampler(UPS_CFG, jax.random.PRNGKey(3))), 3))
    return root
