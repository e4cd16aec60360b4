"""The experiments' PIL line plots (experiments/ablations/common.py: plot_panels)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "ablations" / "common.py"
_spec = importlib.util.spec_from_file_location("ablations_common", _PATH)
common = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = common      # its dataclasses look their module up
_spec.loader.exec_module(common)


def _panels(labels):
    return [{"title": t, "xlabel": "x", "ylabel": "y", "log_x": True,
             "series": [(lab, [1.0, 10.0], [10.0 + i, 0.01 * i]) for i, lab in enumerate(labels)]}
            for t in ("a", "b")]


def _colours(img, box):
    return {c for c in Image.Image.crop(img, box).getdata()}


def test_shared_legend_sits_below_the_panels_and_keeps_one_style_per_label(tmp_path):
    labels = [f"recipe {i}" for i in range(14)]          # more than the colour cycle
    width, height = 300, 200
    img = Image.open(common.plot_panels(tmp_path / "p.png", _panels(labels), width=width,
                                        height=height, legend="below"))
    ncols = 2 * width // 230
    assert img.size == (2 * width, height + 10 + 14 * -(-len(labels) // ncols))
    # every colour of the cycle is drawn in the legend strip and in both panels
    legend, left, right = (_colours(img, (0, height, 2 * width, img.size[1])),
                           _colours(img, (0, 0, width, height)),
                           _colours(img, (width, 0, 2 * width, height)))
    for c in common._COLOURS:
        assert c in legend and c in left and c in right
    # with legend="below" no legend is drawn inside a panel: its top-right corner (where the
    # lines run low) stays empty
    corner = np.asarray(img.crop((2 * width - 126, 40, 2 * width - 20, 60)))
    inside = np.asarray(Image.open(common.plot_panels(
        tmp_path / "q.png", _panels(labels), width=width, height=height)).crop(
            (2 * width - 126, 40, 2 * width - 20, 60)))
    assert (corner == 255).all() and not (inside == 255).all()


def test_unknown_legend_placement_is_refused(tmp_path):
    with pytest.raises(ValueError, match="legend must be 'panel' or 'below'"):
        common.plot_panels(tmp_path / "p.png", _panels(["a"]), legend="right")
