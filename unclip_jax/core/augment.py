"""Training-time augmentation of captioned-shapes examples that keeps every caption true.

Colour drop (`colour_drop`): with probability ``p`` an example's image becomes grayscale and its
caption names no colour ("a small triangle to the left of a big square"). A CLIP trained on
the plain captions learns image features in which colour and shape are entangled: a shape is
recognised through the (colour, shape) pairs it was seen in, and a held-out pair such as a red
triangle is pulled toward the seen pair of the same colour. Grayscale images paired with
colourless captions can only be matched through shape, size and layout, so they reward shape
features that do not depend on colour. The augmented image is a pure function of the stored
one (no new colour is ever painted), so a held-out (colour, shape) pair is never produced.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from unclip_jax.core import shapes

# ITU-R BT.601 luma weights: the grey level a viewer would see.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def grayscale(image: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB → ``[H, W, 3]`` uint8 with the luma in every channel."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"grayscale expects an [H, W, 3] uint8 image, got shape "
                         f"{image.shape} dtype {image.dtype}")
    luma = np.clip(np.rint(image.astype(np.float32) @ _LUMA), 0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=-1)


def colourless_caption(arrays: Mapping[str, np.ndarray]) -> str:
    """The caption of a stored example with the colour words left out:
    "a small triangle" / "a small triangle to the left of a big square"."""
    scene = shapes.arrays_to_scene(arrays)
    words = [" ".join(w for w in ("a", obj.size, obj.shape) if w) for obj in scene.objects]
    if scene.num_objects == 2:
        return f"{words[0]} {scene.relation} {words[1]}"
    return words[0]


def colour_drop(example: Mapping[str, np.ndarray], rng: np.random.Generator,
                p: float) -> Mapping[str, np.ndarray]:
    """With probability ``p``: a copy of ``example`` with a grayscale ``image`` and a colourless
    ``caption`` (bytes, as stored); otherwise ``example`` itself."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"colour-drop probability must be in [0, 1], got {p}")
    if rng.random() >= p:
        return example
    out = dict(example)
    out["image"] = grayscale(example["image"])
    out["caption"] = colourless_caption(example).encode("utf-8")
    return out
