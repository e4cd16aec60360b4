"""Tiny shared test objects, importable at module level (``from tiny import TINY_CLIP``); the
session fixtures built from them are in ``conftest.py``.

``TINY_CLIP`` is the one tiny CLIP config: tests that need another size or vocabulary start from
it with ``dataclasses.replace`` and say what differs. Sharing one shape across files also shares
the compiled XLA programs of a test process. ``TINY_PRIOR``, ``TINY_DECODER`` and
``TINY_UPSAMPLER`` complete it to the tiny unCLIP chain (8 px decoder, 16 px upsampler) whose
random params :func:`unclip_params` draws.
"""

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core import shapes, sharding
from unclip_jax.models import decoder as D
from unclip_jax.models import prior as P
from unclip_jax.models.clip import CLIP, CLIPConfig
from unclip_jax.core.text import EOS_ID, PAD_ID

# 8 px images in 2×2 patches of 4 px, one layer of width 16 per tower, 8-d embeddings, 12 tokens
# over a vocabulary of 64 (room for the shapes tokenizer's 60).
TINY_CLIP = CLIPConfig(embed_dim=8, image_size=8, patch_size=4, vision_width=16,
                       vision_layers=1, vision_heads=2, vocab_size=64, context_length=12,
                       text_width=16, text_layers=1, text_heads=2, eos_id=EOS_ID, pad_id=PAD_ID)

# The shapes tokenizer: trained on the captions of the first SHAPES_CAPTIONS scenes (seed 0).
SHAPES_CAPTIONS, SHAPES_VOCAB = 200, 60

# The tiny captioned-shapes build: 16 px, 32 / 8 / 8 examples, seed 0.
SHAPES_RES = 16
SHAPES_SIZES = dict(num_train=32, num_validation=8, num_test=8)


def shapes_captions(n: int = SHAPES_CAPTIONS) -> list[str]:
    """The captions of scenes 0 … n − 1 of seed 0 (what the shapes tokenizer is trained on)."""
    return [shapes.caption(shapes.sample_scene(0, i)) for i in range(n)]


# The rest of the tiny unCLIP chain on TINY_CLIP: prior → 8 px decoder → 16 px upsampler.
_E, _L = TINY_CLIP.embed_dim, TINY_CLIP.context_length
TINY_PRIOR = P.PriorConfig(embed_dim=_E, text_width=16, context_length=_L, width=16, depth=1,
                           num_heads=2, num_timesteps=100, sample_steps=3, num_candidates=2,
                           guidance_scale=2.0)
TINY_DECODER = D.DecoderConfig(image_size=8, clip_dim=_E, clip_image_size=8, base_channels=8,
                               channel_mult=(1,), num_res_blocks=1, attention_resolutions=(8,),
                               head_channels=8, num_timesteps=100, sample_steps=3)
TINY_UPSAMPLER = D.UpsamplerConfig(image_size=16, low_res_size=8, base_channels=8,
                                   channel_mult=(1,), num_res_blocks=1, num_timesteps=100,
                                   sample_steps=2)


def random_params(abstract, seed: int, std: float = 0.2):
    """Every param of ``abstract`` (an ``eval_shape`` of ``init``) drawn N(0, std²), norm
    scales around 1: the default init zeroes the output layers, which would make a denoiser
    trivially invertible."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((1.0 if "scale" in str(path[-1]) else 0.0)
                                    + std * rng.normal(size=s.shape), jnp.float32),
        sharding.strip_boxes(abstract)["params"])


def unclip_params() -> dict:
    """``{"clip", "prior", "decoder", "upsamplers": (upsampler,)}`` of the tiny chain, each
    from :func:`random_params` (seeds 0, 1, 2, 3)."""
    cond = {"text_emb": jnp.zeros((1, _E)), "text_states": jnp.zeros((1, _L, 16)),
            "text_mask": jnp.ones((1, _L), bool)}
    clip = random_params(jax.eval_shape(lambda: CLIP(TINY_CLIP).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, _L), jnp.int32))), 0)
    prior = random_params(jax.eval_shape(lambda: P.DiffusionPrior(TINY_PRIOR).init(
        jax.random.PRNGKey(1), jnp.zeros((1, _E)), jnp.zeros((1,), jnp.int32), cond)), 1)
    dec = random_params(jax.eval_shape(
        lambda: D.init_decoder(TINY_DECODER, jax.random.PRNGKey(2))), 2)
    ups = random_params(jax.eval_shape(
        lambda: D.init_upsampler(TINY_UPSAMPLER, jax.random.PRNGKey(3))), 3)
    return {"clip": clip, "prior": prior, "decoder": dec, "upsamplers": (ups,)}


def write_run(workdir, model_cfg, params) -> None:
    """A training run's on-disk layout: config.json and one complete checkpoint (no EMA)."""
    import json
    from pathlib import Path

    from unclip_jax.core import config as config_lib
    from unclip_jax.train.checkpoint import Checkpointer

    workdir = Path(workdir)
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(
        {"model": config_lib.to_dict(model_cfg), "train": {"ema_decay": 0.0}}))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(1, {"params": params}, {"position": 0}, {})
    ckpt.close()


def write_tiny_unclip(root, tokenizer_path=None):
    """``root/{tokenizer.model, clip, prior, decoder, upsampler}``: the tiny chain of
    :func:`unclip_params` in the layout of ``make demo`` (what the notebook, the commands and
    coco-fid load); the shapes tokenizer copied from ``tokenizer_path`` or trained."""
    import shutil
    from pathlib import Path

    from unclip_jax.core.text import Tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, root / "tokenizer.model")
    else:
        Tokenizer.train(shapes_captions(), root / "tokenizer.model", SHAPES_VOCAB)
    params = unclip_params()
    for name, cfg, p in (("clip", TINY_CLIP, params["clip"]),
                         ("prior", TINY_PRIOR, params["prior"]),
                         ("decoder", TINY_DECODER, params["decoder"]),
                         ("upsampler", TINY_UPSAMPLER, params["upsamplers"][0])):
        write_run(root / name, cfg, p)
    return root
