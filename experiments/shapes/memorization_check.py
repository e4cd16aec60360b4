"""Does a decoder denoise the scenes it trained on better than new ones? (issue 20: would more
unique training scenes, at equal steps, teach it more?)

The demo's decoder sees its 20 000 training scenes about 15 times (4600 steps × 64). Scenes are
a pure function of (seed, split, index), so train-split scenes past the dataset's ``num_train``
are new draws from the training distribution. This script evaluates the decoder's own training
loss (drops off, the same timesteps and noise at every batch position of each set) on
  * the first ``--num`` training scenes (seen ~15 times),
  * as many train-split scenes from index ``--unseen-from`` on (never seen, same pairs),
  * as many test-split scenes (held-out colour–shape pairs),
and prints each set's mean and the paired differences with their standard errors.
``--without-caption`` drops every caption (the conditioning variations decode from: the CLIP
image embedding alone).

    python experiments/shapes/memorization_check.py runs/demo/decoder
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core import shapes
from unclip_jax.core.text import Tokenizer
from unclip_jax.data import input_pipeline
from unclip_jax.models import decoder as D
from unclip_jax.train import runs


def scene_batch(split: str, start: int, num: int, size: int, tok: Tokenizer, length: int):
    """Images in [-1, 1] and caption tokens of scenes ``start .. start + num`` of ``split``."""
    scenes = [shapes.sample_scene(0, i, split) for i in range(start, start + num)]
    batch = input_pipeline.image_text_batch([shapes.render(s, size) for s in scenes],
                                            [shapes.caption(s) for s in scenes],
                                            np.ones(num, bool), tok, length)
    return batch["image"], batch["tokens"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("decoder", help="a decoder run")
    ap.add_argument("--num", type=int, default=1024, help="scenes per set")
    ap.add_argument("--unseen-from", type=int, default=20_000,
                    help="first train-split index the decoder never saw (its num_train)")
    ap.add_argument("--repeats", type=int, default=4, help="noise draws per scene")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--without-caption", action="store_true",
                    help="drop every caption: the CLIP image embedding alone, as variations")
    args = ap.parse_args(argv)

    params, cfg = runs.load_decoder(args.decoder)
    cfg = dataclasses.replace(cfg, clip_drop_prob=0.0, uncond_drop_prob=0.0,
                              text_drop_prob=1.0 if args.without_caption else 0.0)
    clip = runs.load_clip(cfg.clip_workdir)
    tok = Tokenizer.load(runs.tokenizer_path(args.decoder))

    embed = jax.jit(clip.embed_images)

    @jax.jit
    def loss(x, emb, tokens, rng):
        return D.decoder_loss(params, cfg, x, emb, tokens, rng)[0]

    sets = {"seen": ("train", 0), "unseen": ("train", args.unseen_from), "held_out": ("test", 0)}
    losses = {}
    for name, (split, start) in sets.items():
        x, tokens = scene_batch(split, start, args.num, cfg.image_size, tok, cfg.context_length)
        x, tokens = jnp.asarray(x), jnp.asarray(tokens)
        # each batch's CLIP embedding once, reused by every noise draw
        embs = {b: embed(x[b:b + args.batch]) for b in range(0, args.num, args.batch)}
        losses[name] = np.array([
            float(loss(x[b:b + args.batch], emb, tokens[b:b + args.batch],
                       jax.random.PRNGKey(100_000 * r + b)))
            for r in range(args.repeats) for b, emb in embs.items()])
    row = {"decoder": args.decoder, "num": args.num, "caption": not args.without_caption,
           **{k: v.mean() for k, v in losses.items()}}
    for other in ("unseen", "held_out"):
        d = losses[other] - losses["seen"]
        row[f"{other}_minus_seen"] = d.mean()
        row[f"{other}_minus_seen_se"] = d.std(ddof=1) / np.sqrt(len(d))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
