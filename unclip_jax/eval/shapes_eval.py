"""Zero-shot attribute accuracy of a CLIP on fresh captioned-shapes renders.

Each attribute (colour, shape, size) is a zero-shot classification problem: the class
embedding of colour ``c`` is the prompt ensemble of every caption "a {size} {c} {shape}" over
the other two attributes (CLIP's prompt ensembling), so no image of the evaluation set, and no
held-out (colour, shape) pair, is needed to build the classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from unclip_jax import shapes
from unclip_jax.eval import zero_shot

ATTRIBUTES = ("colour", "shape", "size")


def _templates(attribute: str) -> list[Callable[[str], str]]:
    """Prompt templates for ``attribute``: one per combination of the other two attributes."""
    if attribute == "colour":
        return [lambda c, z=z, s=s: f"a {z} {c} {s}" for z in shapes.SIZES for s in shapes.SHAPES]
    if attribute == "shape":
        return [lambda s, z=z, c=c: f"a {z} {c} {s}" for z in shapes.SIZES for c in shapes.COLOURS]
    if attribute == "size":
        return [lambda z, c=c, s=s: f"a {z} {c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]
    raise ValueError(f"unknown attribute {attribute!r}; accepted: {', '.join(ATTRIBUTES)}")


def classes(attribute: str) -> tuple[str, ...]:
    return {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "size": shapes.SIZES}[attribute]


def render_eval_set(image_size: int, num: int, split: str = "test", seed: int = 1234):
    """``(images [N, S, S, 3] float32 in [-1, 1], scenes)``: fresh single-object renders."""
    scenes = [shapes.sample_scene(seed, i, split, num_objects=1) for i in range(num)]
    images = np.stack([shapes.render(s, image_size) for s in scenes]).astype(np.float32)
    return images / 127.5 - 1.0, scenes


def zero_shot_accuracy(model, params, tokenize: Callable[[list[str]], np.ndarray], *,
                       image_size: int, num: int = 500, split: str = "test",
                       seed: int = 1234) -> dict[str, float]:
    """``{"zs_colour": acc, "zs_shape": acc, "zs_size": acc}`` in [0, 1] on ``num`` fresh
    single-object renders of ``split`` (the test split holds only held-out colour–shape pairs)."""
    images, scenes = render_eval_set(image_size, num, split, seed)
    img_emb = zero_shot.encode_images(model, params, images)
    out = {}
    for attribute in ATTRIBUTES:
        names = classes(attribute)
        classifier = zero_shot.build_classifier(model, params, tokenize, names,
                                                _templates(attribute))
        labels = np.array([names.index(getattr(s.objects[0], attribute)) for s in scenes])
        out[f"zs_{attribute}"] = float(zero_shot.accuracy(img_emb, labels, classifier))
    return out
