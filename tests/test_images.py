"""The image utilities of the core layer: [-1, 1] → uint8 and the one grid builder."""

import numpy as np
import pytest
from PIL import Image

from unclip_jax.core import images


def test_to_uint8_rounds_half_to_even_and_clips():
    x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0, 1 / 255 - 1], np.float32)   # 1/255 − 1 → 0.5
    np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 128, 255, 255, 0])
    back = images.to_float(images.to_uint8(np.linspace(-1, 1, 256, dtype=np.float32)))
    np.testing.assert_allclose(back, np.linspace(-1, 1, 256), atol=1 / 255)


def test_image_grid_layout_gaps_and_short_rows():
    a = np.full((3, 4, 5, 3), 10, np.uint8)
    b = np.zeros((1, 4, 5, 3), np.float32)                  # float rows go through to_uint8
    g = images.image_grid([a, b], gap=2)
    assert g.shape == (2 * 6, 3 * 7, 3) and g.dtype == np.uint8
    assert (g[:4, :5] == 10).all() and (g[6:10, :5] == 128).all()
    assert (g[4:6] == 255).all() and (g[6:, 7:] == 255).all()   # gap row, missing cells
    flat = images.image_grid([a, a])                         # gap 0: plain concatenation
    np.testing.assert_array_equal(flat, np.full((8, 15, 3), 10, np.uint8))
    with pytest.raises(ValueError, match="no images"):
        images.image_grid([])


def test_save_grid_columns(tmp_path):
    path = images.save_grid(np.zeros((6, 8, 8, 3), np.uint8), tmp_path / "d" / "g.png",
                            columns=3)
    assert Image.open(path).size == (3 * 10, 2 * 10)
    with pytest.raises(ValueError, match=r"save_grid takes uint8"):
        images.save_grid(np.zeros((8, 8, 3), np.uint8), tmp_path / "x.png")
