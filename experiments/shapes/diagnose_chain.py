"""Where does the unCLIP chain lose the shapes judge? Each stage fed the ideal input.

On the demo's held-out prompts (``demo.held_out_scenes``: 64 one-object, 64 two-object):

* ``real 32 px`` / ``real 32 px → upsampler``: the prompts' own renders, judged as they are and
  after the diffusion upsampler (the upsampler's ceiling);
* ``true emb + caption → decoder``: the decoder given the CLIP image embedding of the prompt's
  own render (a perfect prior) and the caption, judged at 32 px, with the objects the judge
  got wrong broken down by size and by what was wrong;
* ``prior → decoder``: the chain without its upsampler (the prior's embedding instead of the
  true one), judged at 32 px;
* ``true emb + caption → decoder, seen pairs``: the same as the true-embedding row on 64
  one-object scenes of the *train* split (colour–shape pairs the decoder was trained on), to
  separate drawing errors from failures to compose a held-out pair.

    python experiments/shapes/diagnose_chain.py --workdir runs/demo --decoder runs/decoder_long

A workdir without an upsampler (the demo stopped after its decoder) skips the upsampler row.
``--out FILE`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.commands import demo
from unclip_jax.core import shapes
from unclip_jax.models import decoder as D
from unclip_jax.models.clip import FrozenCLIP
from unclip_jax.pipelines import unclip as U
from unclip_jax.train.eval import metrics

BATCH = 16
SCORES = ("single_colour_shape", "two_both_colour_shape", "relation", "exact")


def batched(fn, *arrays) -> np.ndarray:
    """``fn(i, *slices)`` over ``BATCH``-sized slices, uint8 results concatenated."""
    return np.concatenate([U.to_uint8(fn(i, *(a[i:i + BATCH] for a in arrays)))
                           for i in range(0, len(arrays[0]), BATCH)])


def object_errors(images: np.ndarray, scenes) -> dict[str, int]:
    """Counts per (objects in the scene, size, outcome) and scenes with the wrong count."""
    counts = collections.Counter()
    for image, scene in zip(images, scenes):
        s = shapes.score(shapes.judge(image), scene)
        n = len(scene.objects)
        for obj, ok, colour_ok in zip(scene.objects, s["colour_shape_correct"],
                                      s["colour_correct"]):
            outcome = "ok" if ok else "shape" if colour_ok else "colour"
            counts[f"{n} obj, {obj.size}: {outcome}"] += 1
        counts[f"{n} obj: count wrong"] += not s["num_objects_correct"]
    return dict(sorted(counts.items()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo", help="a `make demo` workdir")
    ap.add_argument("--decoder", default=None, help="decoder workdir (default: WORKDIR/decoder)")
    ap.add_argument("--guidance", type=float, default=None, help="decoder guidance (config's)")
    ap.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = ap.parse_args(argv)
    wd = args.workdir
    ups_dirs = [f"{wd}/upsampler"] if os.path.isdir(f"{wd}/upsampler/checkpoints") else []
    model = U.load_unclip(f"{wd}/clip", f"{wd}/tokenizer.model", f"{wd}/prior",
                          args.decoder or f"{wd}/decoder", ups_dirs)
    dcfg, ups, params = model.decoder, model.upsamplers, model.params
    guidance = jnp.float32(dcfg.guidance_scale if args.guidance is None else args.guidance)
    scenes = demo.held_out_scenes()
    prompts = [shapes.caption(s) for s in scenes]
    results = {}

    def report(name, images, breakdown=False, scenes=scenes):
        s = metrics.judge_scores(images, [shapes.caption(sc) for sc in scenes])
        results[name] = {k: round(s[k], 3) for k in SCORES if s[k] is not None}
        if breakdown:
            results[name]["objects"] = object_errors(images, scenes)
        print(name, json.dumps(results[name]), flush=True)

    renders = np.stack([shapes.render(s, dcfg.image_size) for s in scenes])
    x = renders.astype(np.float32) / 127.5 - 1
    report("real 32 px", renders)
    if ups:
        up_sched = U.upsampler_schedules(ups, [ups[0].sample_steps])
        upsample = jax.jit(lambda p, x, r: U.upsample_chain(ups, p, x, r, schedules=up_sched))
        report("real 32 px → upsampler", batched(
            lambda i, x: upsample(params["upsamplers"], x, jax.random.PRNGKey(i)), x))

    embed = jax.jit(FrozenCLIP(model.clip, params["clip"]).embed_images)
    tokens = jnp.asarray(model.tokenizer.encode(prompts, model.clip.context_length))
    sched = U.decoder_schedule(dcfg, dcfg.sample_steps)

    @jax.jit
    def decode(p, z, t, r, g):
        text = {}
        if dcfg.clip_text_width > 0:        # the caption's CLIP features; uncond: ""
            text = {"clip_text": D.decoder_text_features(
                        FrozenCLIP(model.clip, p["clip"]).encode_text(t)),
                    "uncond_clip_text": D.batched(p["empty_caption"], t.shape[0])}
        return U.decode(dcfg, p["decoder"], z, r, g, schedule=sched, tokens=t, **text)

    def true_emb(x, tokens):
        return batched(lambda i, x, t: decode(params, embed(x), t,
                                              jax.random.PRNGKey(i), guidance), x, tokens)

    report("true emb + caption → decoder", true_emb(x, tokens), breakdown=True)

    bare = dataclasses.replace(model, upsamplers=(), params={**params, "upsamplers": ()})
    report("prior → decoder", np.concatenate([
        U.generate(bare, prompts[i:i + BATCH], seed=i, decoder_guidance=float(guidance))
        for i in range(0, len(prompts), BATCH)]), breakdown=True)

    seen = [shapes.sample_scene(7, i, "train", num_objects=1) for i in range(demo.NUM_JUDGED)]
    seen_prompts = [shapes.caption(s) for s in seen]
    seen_x = np.stack([shapes.render(s, dcfg.image_size) for s in seen]) / 127.5 - 1
    report("true emb + caption → decoder, seen pairs", true_emb(
        seen_x.astype(np.float32), jnp.asarray(model.tokenizer.encode(
            seen_prompts, model.clip.context_length))), breakdown=True, scenes=seen)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
