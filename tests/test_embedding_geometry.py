"""experiments/shapes/embedding_geometry.py on embeddings built from known directions."""

import importlib
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "shapes"))
geometry = importlib.import_module("embedding_geometry").geometry


def _embeddings(flip: bool, repeat: int = 25):
    """z = colour direction + (±) shape direction + size direction, orthonormal directions,
    every (colour, shape, size) cell ``repeat`` times: 8 colours, 5 shapes, 2 sizes."""
    basis = np.eye(8 + 5 + 2)
    colour, shape, size = [], [], []
    for c, k, s in itertools.product(range(8), range(5), range(2)):
        colour += [c] * repeat
        shape += [k] * repeat
        size += [s] * repeat
    colour, shape, size = map(np.array, (colour, shape, size))
    sign = np.where(flip & (size == 1), -1.0, 1.0)[:, None]
    z = basis[colour] + sign * basis[8 + shape] + basis[13 + size]
    return z, colour, shape, size


@pytest.mark.parametrize("flip", [False, True])
def test_geometry_of_known_codes(flip):
    out = geometry(*_embeddings(flip))
    # class means of one-hot directions, equal weights: variance 1 − 1/n over n classes
    assert out["between"]["colour"] == pytest.approx(1 - 1 / 8, abs=1e-4)
    # (with the flip, each size's mean also holds ± the mean shape direction, ‖·‖² = 1/5)
    assert out["between"]["size"] == pytest.approx(0.5 + (0.2 if flip else 0.0), abs=1e-4)
    # a shape code that flips with size cancels when pooled over sizes
    assert out["between"]["shape"] == pytest.approx(0.0 if flip else 1 - 1 / 5, abs=1e-4)
    for size in ("small", "big"):
        assert out["shape_within_size"][size]["between"] == pytest.approx(0.8, abs=1e-4)
        assert out["shape_across_colours"][size]["mean_cos"] == pytest.approx(1.0)
    assert set(out["shape_across_sizes"].values()) == {-1.0 if flip else 1.0}
