"""experiments/shapes/memorization_check.py: its "seen" and "held_out" sets are the built
dataset's own train and test scenes (images and caption tokens), so comparing them with
train-split scenes past ``num_train`` compares seen with never-seen draws."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "shapes"))
scene_batch = importlib.import_module("memorization_check").scene_batch


@pytest.mark.parametrize("split", ["train", "test"])
def test_scene_batch_is_the_built_split(shapes_data, shapes_tokenizer, split):
    from unclip_jax.data import input_pipeline

    source = input_pipeline.open_source(shapes_data, split)
    n = 6
    examples = [source[i] for i in range(n)]
    assert [int(e["index"]) for e in examples] == list(range(n))
    x, tokens = scene_batch(split, 0, n, shapes_data.image_size, shapes_tokenizer,
                            shapes_data.context_length)
    captions = [e["caption"].decode() if isinstance(e["caption"], bytes) else e["caption"]
                for e in examples]
    built = input_pipeline.image_text_batch([e["image"] for e in examples], captions,
                                            np.ones(n, bool), shapes_tokenizer,
                                            shapes_data.context_length)
    stored = built["image"]
    np.testing.assert_array_equal(x, stored)
    np.testing.assert_array_equal(tokens, built["tokens"])
    # scenes past the stored ones are new draws, not repeats of the stored ones
    later, _ = scene_batch(split, n, n, shapes_data.image_size, shapes_tokenizer,
                           shapes_data.context_length)
    assert not any(np.array_equal(a, b) for a in later for b in stored)
