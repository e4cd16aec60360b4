"""Which objects the decoder loses, and from which noise level (issue 20's diagnosis).

Three measurements on one decoder in the chain of a ``make demo`` workdir, each one row of
``runs/curve/shapes.jsonl``:

* ``pairs``: held-out single-object test renders (the demo's prompts), decoded from the
  render's own CLIP image embedding with its caption ("caption + emb") and without
  ("emb only", as variations are), judged at the decoder's 32 px and after the upsampler at
  64 px, split by (size, colour, shape);
* ``crosses``: small crosses of every colour (seen pairs and the held-out green one) and small
  green shapes of every kind, the same way;
* ``noise``: real renders of small crosses and diamonds noised to t and denoised by the decoder
  (DDIM 20 steps, caption + embedding, guidance 1 and 3), judged at 32 px: the lowest noise
  level at which the decoder turns an object into another.

    python experiments/shapes/shape_diagnosis.py runs/curve/<decoder run> [--only pairs ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import decoder_curve  # noqa: E402

OUT = decoder_curve.CURVE / "shapes.jsonl"
PARTS = ("pairs", "crosses", "noise")


def _chain(decoder: Path, demo: Path, upsampler: Path | None = None):
    model = decoder_curve.load_chain(decoder, demo, upsampler)
    return decoder_curve.with_samplers(model, "dpmpp_3m:logsnr:20", "dpmpp_3m:logsnr:10")


def _right(images, scenes) -> np.ndarray:
    """Whether each image is judged to hold exactly its one-object scene's (colour, shape)."""
    from unclip_jax.core import shapes

    want = [[(s.objects[0].colour, s.objects[0].shape)] for s in scenes]
    return np.array([sorted((o.colour, o.shape) for o in shapes.judge(im).objects) == w
                     for im, w in zip(images, want)])


def _programs(model):
    """Jitted ``decode(params, z, tokens | None, rng, guidance, x_T=None, schedule=None)`` →
    (32 px, 64 px) images, the chain's decoder sampler unless a schedule is given (then DDIM)."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.pipelines import unclip

    cfg, ups = model.decoder, model.configs[3]
    own = unclip.decoder_schedule(cfg, cfg.sample_steps)
    up_sched = unclip.upsampler_schedules(
        ups, unclip.Settings().resolved(model.configs).upsampler_steps)

    def run(params, z, tokens, rng, guidance, x_T, schedule):
        r_dec, r_up = jax.random.split(rng)
        x = unclip.decode(cfg, params["decoder"], z, r_dec, guidance,
                          schedule=own if schedule is None else schedule,
                          method=cfg.sample_method if schedule is None else "ddim",
                          tokens=tokens, x_T=x_T)
        x = jnp.clip(x, -1.0, 1.0)
        return x, unclip.upsample_chain(ups, params["upsamplers"], x, r_up, schedules=up_sched)

    return jax.jit(run)


def _decode_both(model, scenes, batch: int = 16):
    """For each conditioning ("caption + emb", "emb only"): (32 px, 64 px) uint8 images of the
    scenes decoded from their renders' CLIP embeddings."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.core import shapes
    from unclip_jax.core.images import to_uint8
    from unclip_jax.pipelines import manipulate

    m = manipulate.Manipulator(model)
    renders = [shapes.render(s, model.decoder.image_size) for s in scenes]
    z = m.embed(m.pixels(renders, m.clip_size))
    tokens = jnp.asarray(model.tokenizer.encode([shapes.caption(s) for s in scenes],
                                                model.clip.context_length), jnp.int32)
    run = _programs(model)
    g = jnp.float32(model.decoder.guidance_scale)
    out = {}
    for name, tok in (("caption + emb", tokens), ("emb only", None)):
        lo, hi = [], []
        for i in range(0, len(scenes), batch):
            a, b = run(model.params, z[i:i + batch], None if tok is None else tok[i:i + batch],
                       jax.random.PRNGKey(i), g, None, None)
            lo.append(to_uint8(np.asarray(a)))
            hi.append(to_uint8(np.asarray(b)))
        out[name] = (np.concatenate(lo), np.concatenate(hi))
    return out


def _split(right: np.ndarray, keys: list) -> dict:
    groups = collections.defaultdict(list)
    for k, r in zip(keys, right):
        groups[k].append(bool(r))
    return {k: [round(float(np.mean(v)), 3), len(v)] for k, v in sorted(groups.items())}


def pairs(model, num: int) -> dict:
    from unclip_jax.core import shapes

    scenes = [shapes.sample_scene(7, i, "test", num_objects=1) for i in range(num)]
    keys = [" ".join((s.objects[0].size, s.objects[0].colour, s.objects[0].shape))
            for s in scenes]
    row = {}
    for name, (lo, hi) in _decode_both(model, scenes).items():
        for res, images in (("32px", lo), ("64px", hi)):
            right = _right(images, scenes)
            row[f"{name} @{res}"] = {"all": round(float(right.mean()), 3),
                                     "groups": _split(right, keys)}
    return row


def _small(colour_shapes, per: int, seed: int):
    from unclip_jax.core import shapes

    rng = np.random.default_rng(seed)
    return [shapes.Scene((shapes.ShapeObject(c, s, "small", float(rng.uniform(.2, .8)),
                                             float(rng.uniform(.2, .8))),))
            for c, s in colour_shapes for _ in range(per)]


def crosses(model, per: int) -> dict:
    from unclip_jax.core import shapes

    kinds = ([(c, "cross") for c in shapes.COLOURS]
             + [("green", s) for s in shapes.SHAPES if s != "cross"])
    scenes = _small(kinds, per, 0)
    keys = [f"{s.objects[0].colour} {s.objects[0].shape}" for s in scenes]
    row = {}
    for name, (lo, hi) in _decode_both(model, scenes).items():
        for res, images in (("32px", lo), ("64px", hi)):
            row[f"{name} @{res}"] = _split(_right(images, scenes), keys)
    return row


def noise(model, per: int) -> dict:
    import jax
    import jax.numpy as jnp

    from unclip_jax.core import diffusion, shapes
    from unclip_jax.core.images import to_uint8
    from unclip_jax.pipelines import manipulate

    kinds = [("green", "cross"), ("red", "cross"), ("green", "diamond"), ("purple", "diamond")]
    scenes = _small(kinds, per, 1)
    keys = [f"{s.objects[0].colour} {s.objects[0].shape}" for s in scenes]
    cfg = model.decoder
    m = manipulate.Manipulator(model)
    renders = [shapes.render(s, cfg.image_size) for s in scenes]
    x0 = m.pixels(renders)
    z = m.embed(m.pixels(renders, m.clip_size))
    tokens = jnp.asarray(model.tokenizer.encode([shapes.caption(s) for s in scenes],
                                                model.clip.context_length), jnp.int32)
    betas = diffusion.base_betas(cfg.schedule, cfg.num_timesteps)
    run = _programs(model)
    row = {}
    for t in (50, 100, 200, 400):
        ab = float(np.cumprod(1.0 - betas)[t])
        # the base schedule cut at t (the same ᾱ), 20 DDIM steps from t down to 0
        schedule = diffusion.respace(diffusion.from_betas(betas[:t + 1]), "20")
        x_t = (np.sqrt(ab) * x0
               + np.sqrt(1 - ab) * jax.random.normal(jax.random.PRNGKey(t), x0.shape))
        for g in (1.0, 3.0):
            lo, _ = run(model.params, z, tokens, jax.random.PRNGKey(0), jnp.float32(g), x_t,
                        schedule)
            right = _right(to_uint8(np.asarray(lo)), scenes)
            row[f"t={t} (σ={np.sqrt((1 - ab) / ab):.2f}) g={g:g} @32px"] = _split(right, keys)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decoder_curve.add_chain_args(p)
    p.add_argument("--upsampler", type=Path, default=None,
                   help="another upsampler run instead of the demo's")
    p.add_argument("--num", type=int, default=128, help="held-out renders for 'pairs'")
    p.add_argument("--per", type=int, default=16, help="renders per kind for the others")
    p.add_argument("--only", nargs="+", default=list(PARTS), choices=PARTS)
    args = p.parse_args(argv)
    if args.num < 1 or args.per < 1:
        p.error(f"--num and --per must be ≥ 1, got {args.num} and {args.per}")
    model = _chain(args.decoder, args.demo, args.upsampler)
    for part in args.only:
        t0 = time.perf_counter()
        result = {"pairs": lambda: pairs(model, args.num),
                  "crosses": lambda: crosses(model, args.per),
                  "noise": lambda: noise(model, args.per)}[part]()
        row = {"decoder": str(args.decoder), "part": part,
               "upsampler": str(args.upsampler or args.demo / "upsampler"), **result,
               "wall_s": round(time.perf_counter() - t0, 1),
               "load_average_1min": round(os.getloadavg()[0], 1)}
        decoder_curve.append_row(OUT, row)


if __name__ == "__main__":
    main()
