"""How the demo CLIP's image embeddings code colour, shape and size (issue 20's variation
diagnosis): what a decoder must read from the embedding alone to draw a variation.

On the single-object renders of the embedding cache's train split (seen pairs only):

* ``between``: each attribute's between-class variance (the variance of the class means,
  weighted by class frequency), next to the embeddings' total variance;
* ``shape_within_size``: the same for shape within each size;
* ``shape_across_colours``: mean and least cosine between shape-contrast vectors (the mean
  embedding of shape a minus that of shape b) measured in different colours, per size: near 1
  means shape is coded the same way whatever the colour (a held-out (colour, shape) pair is
  then a sum of seen directions);
* ``shape_across_sizes``: per shape, the cosine between its contrast vector (its mean minus
  the mean over shapes) among small objects and among big ones.

::

    python experiments/shapes/embedding_geometry.py [--embeddings runs/demo/embeddings]

prints one JSON row and appends it to ``runs/curve/embedding_geometry.jsonl``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import decoder_curve  # noqa: E402

from unclip_jax.core import shapes  # noqa: E402
from unclip_jax.train import embeddings  # noqa: E402

OUT = decoder_curve.CURVE / "embedding_geometry.jsonl"
MIN_PER_CELL = 20       # renders a (size, colour, shape) cell needs for its mean to count


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def between_variance(z: np.ndarray, labels: np.ndarray) -> float:
    """Σ_c p_c ‖mean_c − mean‖² of the rows ``z`` grouped by ``labels``."""
    zc = z - z.mean(0)
    return float(sum(np.mean(labels == c) * np.sum(zc[labels == c].mean(0) ** 2)
                     for c in np.unique(labels)))


def geometry(z: np.ndarray, colour: np.ndarray, shape: np.ndarray, size: np.ndarray) -> dict:
    """The figures of the module docstring for single-object embeddings ``z`` [N, E] and their
    attribute indices."""
    out = {"renders": int(len(z)), "total_variance": round(float(z.var(0).sum()), 4),
           "between": {name: round(between_variance(z, lab), 4)
                       for name, lab in (("colour", colour), ("shape", shape), ("size", size))}}
    out["shape_within_size"] = {
        shapes.SIZES[s]: {"between": round(between_variance(z[size == s], shape[size == s]), 4),
                          "total": round(float(z[size == s].var(0).sum()), 4)}
        for s in np.unique(size)}

    def cell(s, c, k):
        sel = (size == s) & (colour == c) & (shape == k)
        return z[sel].mean(0) if sel.sum() >= MIN_PER_CELL else None

    across_colours = {}
    for s in np.unique(size):
        cos = []
        for a, b in itertools.combinations(np.unique(shape), 2):
            vecs = [cell(s, c, a) - cell(s, c, b) for c in np.unique(colour)
                    if cell(s, c, a) is not None and cell(s, c, b) is not None]
            cos += [_cos(u, v) for u, v in itertools.combinations(vecs, 2)]
        across_colours[shapes.SIZES[s]] = {"mean_cos": round(float(np.mean(cos)), 3),
                                           "min_cos": round(float(np.min(cos)), 3)}
    out["shape_across_colours"] = across_colours

    def contrasts(s):
        means = np.stack([z[(size == s) & (shape == k)].mean(0) for k in np.unique(shape)])
        return means - means.mean(0)

    small, big = (contrasts(shapes.SIZES.index(n)) for n in ("small", "big"))
    out["shape_across_sizes"] = {shapes.SHAPES[k]: round(_cos(small[i], big[i]), 3)
                                 for i, k in enumerate(np.unique(shape))}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", type=Path, default=Path("runs/demo/embeddings"),
                   help="an embedding cache (unclip-jax embed / the prior's)")
    args = p.parse_args(argv)
    d = embeddings.load_split(str(args.embeddings), "train")
    one = d["num_objects"] == 1
    row = {"embeddings": str(args.embeddings),
           **geometry(d["image_emb"][one].astype(np.float64), d["colour"][one][:, 0],
                      d["shape"][one][:, 0], d["size"][one][:, 0])}
    decoder_curve.append_row(OUT, row)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
