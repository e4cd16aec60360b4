"""The prior evaluation's retrieval judge (experiments/shapes/eval_priors.py)."""

import importlib.util
from pathlib import Path

import numpy as np

from unclip_jax.core import shapes

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "shapes" / "eval_priors.py"
_spec = importlib.util.spec_from_file_location("eval_priors", _PATH)
eval_priors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_priors)


def _rows(*captions):
    arrays = [shapes.scene_to_arrays(shapes.parse_caption(c)) for c in captions]
    return {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}


def test_inverse_relation_table_matches_the_relation_words():
    inv = {"to the left of": "to the right of", "above": "below"}
    inv.update({v: k for k, v in inv.items()})
    for i, rel in enumerate(shapes.RELATIONS):
        assert shapes.RELATIONS[eval_priors.INVERSE_RELATION[i]] == inv[rel]


def test_attribute_match_accepts_the_same_scene_described_in_the_other_order():
    q = _rows("a red square to the left of a blue circle",
              "a red square to the left of a blue circle",
              "a big red square above a blue circle", "a green triangle", "a green triangle")
    r = _rows("a blue circle to the right of a red square",   # same scene, other order
              "a blue circle to the left of a red square",    # other order, wrong relation
              "a blue circle below a small red square",       # named size differs
              "a small green triangle",                       # size not named: any size
              "a green triangle above a red circle")          # count differs
    exact, cs = eval_priors.attribute_match(q, r)
    np.testing.assert_array_equal(exact, [True, False, False, True, False])
    np.testing.assert_array_equal(cs, [True, True, True, True, False])
