"""Where the chain's variation consistency is lost (issue 20): one decoder, several ways.

The demo's figure is :func:`~unclip_jax.pipelines.manipulate.variation_consistency`: held-out
single-object renders, DDIM-inverted, 4 variations each with DDIM η = 1 at the decoder's
guidance, judged at the output resolution. This script measures it on more renders, split by
object size, next to the same decoder

* reconstructing (η = 0 from the inversion: what the latents hold),
* from fresh noise (the decoder's own sampler: what the embedding alone holds),
* at other guidance scales and η,
* judged at the decoder's resolution, before the upsampler,

split by object size and by held-out (colour, shape) pair (``--split train``: the same on
renders of seen pairs, what the decoder was fit on),

with the variations' spread (``diversity``: RMS pixel distance between the 4 variations of
each of the first 8 renders), and appends one JSON row per way to ``runs/curve/variations.jsonl``::

    python experiments/shapes/variation_diagnosis.py runs/curve/<decoder run> --renders 64
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import decoder_curve  # noqa: E402

from unclip_jax.core import shapes  # noqa: E402
from unclip_jax.pipelines import manipulate  # noqa: E402

OUT = decoder_curve.CURVE / "variations.jsonl"
# name -> (variation_consistency options; None = reconstruction instead of variations)
WAYS = {
    "demo (inversion, η 1, guidance 3)": dict(guidance_scale=3.0),
    "reconstruction (inversion, η 0)": None,
    "fresh noise (3M, guidance 3)": dict(guidance_scale=3.0, from_inversion=False),
    "inversion, η 1, guidance 1": dict(guidance_scale=1.0),
    "inversion, η 1, guidance 5": dict(guidance_scale=5.0),
    # the paper's variations take any η > 0: less η keeps more of the inverted x_T
    "inversion, η 0.5, guidance 3": dict(guidance_scale=3.0, eta=0.5),
    "inversion, η 0.25, guidance 3": dict(guidance_scale=3.0, eta=0.25),
    # η = 1 is ancestral sampling, whose error falls with the number of steps (the demo's: 50
    # strided DDIM steps for the inversion and the variations)
    "inversion, η 1, guidance 3, 25 steps": dict(guidance_scale=3.0, steps=25),
    "inversion, η 1, guidance 3, 100 steps": dict(guidance_scale=3.0, steps=100),
    "inversion, η 1, guidance 3, 200 steps": dict(guidance_scale=3.0, steps=200),
    # the demo's way judged on the decoder's own output: what the upsampler loses
    "demo at the decoder's resolution (no upsampler)": dict(guidance_scale=3.0),
}
NO_UPSAMPLER = {"demo at the decoder's resolution (no upsampler)"}   # ways without it
DIVERSE = 8     # renders whose variations' spread is measured (``diversity``)


def diversity(model, images, options: dict) -> float:
    """Mean RMS pixel distance (0–255 scale) between the 4 variations of each image, over the
    pairs: how much the variations still vary (0 = four copies)."""
    spread = []
    for k, image in enumerate(images):
        outs = manipulate.variations(model, image, n=4, seed=k, **options).astype(np.float64)
        spread += [np.sqrt(np.mean((outs[a] - outs[b]) ** 2))
                   for a in range(4) for b in range(a + 1, 4)]
    return float(np.mean(spread))


def reconstruction_consistency(model, images) -> float:
    """Fraction of images whose η = 0 reconstruction (guidance 3) is judged like the image."""
    same = []
    for image in images:
        want = shapes.judge(image).objects
        got = shapes.judge(manipulate.reconstruct(model, image, guidance_scale=3.0)[0]).objects
        same.append(sorted((o.colour, o.shape) for o in got)
                    == sorted((o.colour, o.shape) for o in want))
    return float(np.mean(same))


def _split(right: dict[int, float], keys: list[str]) -> dict:
    """``{key: {"consistency", "renders"}}`` of the per-render figures ``right`` grouped by
    ``keys[i]``."""
    out = {}
    for key in sorted(set(keys)):
        vals = [right[i] for i, k in enumerate(keys) if k == key]
        out[key] = {"consistency": round(float(np.mean(vals)), 4), "renders": len(vals)}
    return out


def diagnose(decoder: Path, demo: Path, renders: int, ways: list[str],
             split: str = "test") -> list[dict]:
    model = decoder_curve.load_chain(decoder, demo)
    model = decoder_curve.with_samplers(model, "dpmpp_3m:logsnr:20", "dpmpp_3m:logsnr:10")
    scenes = [shapes.sample_scene(7, i, split, num_objects=1) for i in range(renders)]
    images = [shapes.render(s, model.decoder.image_size) for s in scenes]
    sizes = sorted({s.objects[0].size for s in scenes})
    rows = []
    for name in ways:
        options = WAYS[name]
        way_model = model if name not in NO_UPSAMPLER else dataclasses.replace(
            model, upsamplers=(), params={**model.params, "upsamplers": ()})
        t0 = time.perf_counter()
        # one render at a time, with the seed it has in its size group (as one call per
        # group would give it), so that the figures can be split by size and by pair
        right = {}
        for size in sizes:
            group = [i for i, s in enumerate(scenes) if s.objects[0].size == size]
            for k, i in enumerate(group):
                right[i] = (reconstruction_consistency(way_model, [images[i]])
                            if options is None else manipulate.variation_consistency(
                                way_model, [images[i]], n=4, seed=k, **options))
        total = float(np.mean(list(right.values())))
        row = {"decoder": str(decoder), "way": name, "split": split, "renders": renders,
               "consistency": round(total, 4),
               "diversity": (None if options is None else
                             round(diversity(way_model, images[:DIVERSE], options), 2)),
               "by_size": _split(right, [s.objects[0].size for s in scenes]),
               "by_pair": _split(right, [f"{s.objects[0].colour} {s.objects[0].shape}"
                                         for s in scenes]),
               "wall_s": round(time.perf_counter() - t0, 1),
               "load_average_1min": round(os.getloadavg()[0], 1)}
        decoder_curve.append_row(OUT, row)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decoder_curve.add_chain_args(p)
    p.add_argument("--renders", type=int, default=64, help="held-out single-object renders")
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    p.add_argument("--split", default="test", choices=("test", "train"),
                   help="test: held-out (colour, shape) pairs (the demo's figure); train: seen")
    args = p.parse_args(argv)
    if args.renders < 1:
        p.error(f"--renders must be ≥ 1, got {args.renders}")
    diagnose(args.decoder, args.demo, args.renders, args.ways, args.split)


if __name__ == "__main__":
    main()
