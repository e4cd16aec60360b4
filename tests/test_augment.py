"""Colour drop: grayscale images with colourless captions that stay true, and never a held-out
(colour, shape) pair, on its own and through the training input pipeline."""

import dataclasses

import numpy as np
import pytest

from unclip_jax.core import augment
from unclip_jax.core import shapes as S
from unclip_jax.core.config import DataConfig, ExperimentConfig
from unclip_jax.data.input_pipeline import Batches


def _example(seed, index, split="train", resolution=16):
    scene = S.sample_scene(seed, index, split)
    ex = S.scene_to_arrays(scene)
    ex["image"] = S.render(scene, resolution)
    ex["caption"] = S.caption(scene).encode()
    return scene, ex


def test_grayscale_is_the_luma_in_every_channel():
    img = np.array([[[220, 40, 40], [20, 20, 20]], [[255, 255, 255], [0, 0, 0]]], np.uint8)
    out = augment.grayscale(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    # 0.299·220 + 0.587·40 + 0.114·40 = 93.82 → 94
    np.testing.assert_array_equal(out[..., 0], [[94, 20], [255, 0]])
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32)])
def test_grayscale_rejects_non_rgb_uint8(bad):
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8 image, got shape"):
        augment.grayscale(bad)


def test_colourless_caption_is_the_caption_without_its_colour_words():
    assert augment.colourless_caption(S.scene_to_arrays(S.Scene((
        S.ShapeObject("red", "circle", "small"), S.ShapeObject("blue", "cross", "big")),
        "above"))) == "a small circle above a big cross"
    for i in range(200):
        scene = S.sample_scene(3, i, "train")
        text = augment.colourless_caption(S.scene_to_arrays(scene))
        words = S.caption(scene).split()
        assert text.split() == [w for w in words if w not in S.COLOURS]


def test_colour_drop_keeps_captions_true_and_never_shows_a_held_out_pair():
    dropped = 0
    for i in range(120):
        scene, ex = _example(5, i)
        stored = ex["image"].copy()
        out = augment.colour_drop(ex, np.random.default_rng(i), p=0.5)
        text = out["caption"].decode()
        if out is ex:                      # untouched: the stored, true caption and image
            assert text == S.caption(scene)
            continue
        dropped += 1
        img = out["image"]
        # No colour at all (so no (colour, shape) pair of any kind is shown)...
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0],
                                                                          img[..., 2])
        # ...and the same picture: the luma of the stored render, pixel for pixel.
        np.testing.assert_array_equal(img, augment.grayscale(ex["image"]))
        # The caption names exactly the scene's sizes, shapes and relation, no colour.
        assert not set(text.split()) & set(S.COLOURS)
        assert text == augment.colourless_caption(S.scene_to_arrays(scene))
        for obj in scene.objects:
            assert f"{obj.size} {obj.shape}" in text
        # The stored example is not modified in place.
        assert ex["caption"].decode() == S.caption(scene)
        np.testing.assert_array_equal(ex["image"], stored)
    assert 30 < dropped < 90
    for i in range(120):
        scene, _ = _example(5, i)
        assert not {o.pair for o in scene.objects} & S.HELD_OUT_PAIRS


def test_colour_drop_extremes_and_bad_probability():
    _, ex = _example(1, 0)
    assert augment.colour_drop(ex, np.random.default_rng(0), p=0.0) is ex
    assert augment.colour_drop(ex, np.random.default_rng(0), p=1.0)["caption"] != ex["caption"]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"colour-drop probability must be in \[0, 1\]"):
            augment.colour_drop(ex, np.random.default_rng(0), p=bad)


class _Words:
    """A stand-in tokenizer that returns nothing but lets captions through."""

    def encode(self, texts, length):
        return np.zeros((len(texts), length), np.int32)


def test_colour_drop_through_the_pipeline_is_deterministic_and_train_only():
    import functools

    source = [_example(2, i)[1] for i in range(12)]
    fn = functools.partial(augment.colour_drop, p=0.5)
    kw = dict(batch_size=6, image_size=16, seed=4, tokenizer=_Words(), context_length=8)
    train = Batches(source, train=True, example_fn=fn, **kw)
    again = Batches(source, train=True, example_fn=fn, **kw)
    b, b2 = train.local_numpy(1, captions=True), again.local_numpy(1, captions=True)
    np.testing.assert_array_equal(b["image"], b2["image"])
    assert list(b["caption"]) == list(b2["caption"])
    gray = [np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2])
            for im in b["image"]]
    colourless = [not set(c.split()) & set(S.COLOURS) for c in b["caption"]]
    # (a kept image can be gray too: a white object on the gray background)
    assert all(g for g, c in zip(gray, colourless) if c)
    assert 0 < sum(colourless) < len(colourless)
    # The attribute arrays still describe the scene (they are what the caption came from).
    for c, col, shp in zip(b["caption"], b["colour"], b["shape"]):
        assert S.SHAPES[shp[0]] in c
        if not set(c.split()) & set(S.COLOURS):
            continue
        assert S.COLOURS[col[0]] in c
    evaluation = Batches(source, train=False, example_fn=fn, **kw)
    e = evaluation.local_numpy(0, captions=True)
    assert all(set(c.split()) & set(S.COLOURS) for c in e["caption"])


def test_clip_task_rejects_bad_colour_drop(tmp_path, shapes_tokenizer):
    from unclip_jax.models.clip import CLIPConfig
    from unclip_jax.train.tasks import clip as clip_tasks

    base = ExperimentConfig(name="t", task="clip", model=CLIPConfig(),
                            data=DataConfig(name="image_captions/x",
                                            tokenizer=shapes_tokenizer.path))
    with pytest.raises(ValueError, match="colour_drop applies to captioned_shapes only"):
        clip_tasks.clip_task(dataclasses.replace(
            base, data=dataclasses.replace(base.data, colour_drop=0.5)), tmp_path)


@pytest.mark.parametrize("bad", [-0.5, 1.01])
def test_data_config_rejects_a_colour_drop_outside_0_1(bad):
    with pytest.raises(ValueError, match=r"data.colour_drop is a probability in \[0, 1\], got"):
        DataConfig(colour_drop=bad)
