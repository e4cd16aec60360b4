"""Write the README's Karlo manipulation grids (docs/karlo_*.png) from a tiny converted stack.

The stack is the test suite's (``tests/test_pipeline_karlo.py``): a diffusers-layout Karlo
folder of small *random* tensors converted by ``unclip_jax.pipelines.convert.karlo``, and a random
CLIP
saved as ``unclip-jax convert clip`` saves one — so the pictures show the shapes of the outputs
and that every stage runs (decoder 8 px → super-resolution 32 px), not what Karlo draws. Each
grid's first column is the input at the output resolution. Run from the repository root:

    .venv/bin/python docs/karlo_grids.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

OPTIONS = dict(steps=10, fixed_point_iters=2, decoder_steps=25, upsampler_steps=(7,))


class _Tmp:
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path


def main() -> int:
    import test_pipeline_karlo as T

    from unclip_jax.core import shapes
    from unclip_jax.pipelines import manipulate as M

    with tempfile.TemporaryDirectory() as tmp:
        _, model = T.stack.__wrapped__(_Tmp(Path(tmp)))
        size = model.resolution
        a = shapes.render(shapes.sample_scene(0, 3), 64)
        b = shapes.render(shapes.sample_scene(0, 11), 64)

        def show(image):
            return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))

        grids = {
            "karlo_variations.png": [show(a)] + list(M.variations(
                model, a, n=4, eta=1.0, seed=0, **OPTIONS)),
            "karlo_variations_fresh.png": [show(a)] + list(M.variations(
                model, a, n=4, seed=0, from_inversion=False, **OPTIONS)),
            "karlo_interpolation.png": [show(a)] + list(M.interpolate(
                model, a, b, frames=5, **OPTIONS)) + [show(b)],
            "karlo_text_diff.png": [show(a)] + list(M.text_diff(
                model, a, "hello", "the hello", frames=4, max_angle=0.5, **OPTIONS)),
        }
        for name, row in grids.items():
            M.write_grid([np.stack(row)], ROOT / "docs" / name)
            print(f"wrote docs/{name} ({len(row)} images, {size}×{size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
