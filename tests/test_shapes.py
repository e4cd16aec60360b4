"""Tests of the captioned-shapes renderer, captions, splits, judge and TFDS builder."""

import dataclasses
import math
import os

import numpy as np
import pytest

from unclip_jax.core import shapes as S



def _strip_positions(scene: S.Scene) -> S.Scene:
    return dataclasses.replace(scene, objects=tuple(
        dataclasses.replace(o, x=math.nan, y=math.nan) for o in scene.objects))


def _same_attributes(a: S.Scene, b: S.Scene) -> bool:
    return (a.relation == b.relation and len(a.objects) == len(b.objects) and all(
        (p.colour, p.shape, p.size) == (q.colour, q.shape, q.size)
        for p, q in zip(a.objects, b.objects)))


# --- scenes ---------------------------------------------------------------------------------

def test_sample_scene_is_deterministic_per_seed_split_index():
    for split in S.SPLITS:
        for index in range(20):
            a = S.sample_scene(3, index, split)
            assert a == S.sample_scene(3, index, split)
            np.testing.assert_array_equal(S.render(a, 32),
                                          S.render(S.sample_scene(3, index, split), 32))
    train = [S.sample_scene(0, i, "train") for i in range(50)]
    assert len(set(train)) == 50                          # different indices differ
    assert S.sample_scene(0, 7, "train") != S.sample_scene(0, 7, "validation")
    assert S.sample_scene(0, 7, "train") != S.sample_scene(1, 7, "train")


def test_num_objects_fraction_and_forcing():
    counts = [S.sample_scene(0, i, "train").num_objects for i in range(1000)]
    assert 0.43 < np.mean(np.array(counts) == 2) < 0.57   # default 50/50
    assert all(S.sample_scene(0, i, "train", p_two=0.0).num_objects == 1 for i in range(100))
    assert all(S.sample_scene(0, i, "test", num_objects=2).num_objects == 2 for i in range(100))
    assert all(S.sample_scene(0, i, "validation", num_objects=1).relation is None
               for i in range(100))
    with pytest.raises(ValueError, match="num_objects"):
        S.sample_scene(0, 0, "train", num_objects=3)
    with pytest.raises(ValueError, match="split"):
        S.sample_scene(0, 0, "dev")


def test_held_out_pairs_only_in_test_and_in_every_test_scene():
    assert len(S.HELD_OUT_PAIRS) >= 4
    for split in ("train", "validation"):
        for i in range(600):
            for obj in S.sample_scene(0, i, split).objects:
                assert obj.pair not in S.HELD_OUT_PAIRS, (split, i, obj)
    seen = set()
    for i in range(600):
        scene = S.sample_scene(0, i, "test")
        pairs = {o.pair for o in scene.objects}
        assert pairs & S.HELD_OUT_PAIRS, (i, scene)
        seen |= pairs & S.HELD_OUT_PAIRS
        assert len(pairs) == scene.num_objects            # the two objects differ
    assert seen == S.HELD_OUT_PAIRS


def test_two_object_layout_matches_relation_with_clear_gap():
    for split in S.SPLITS:
        for i in range(300):
            scene = S.sample_scene(5, i, split, num_objects=2)
            a, b = scene.objects
            ra, rb = S.SIZE_RADIUS[a.size], S.SIZE_RADIUS[b.size]
            for o, r in ((a, ra), (b, rb)):                 # inside the image
                assert r <= o.x <= 1 - r and r <= o.y <= 1 - r
            dx, dy = a.x - b.x, a.y - b.y
            along, across = {"to the left of": (-dx, dy), "to the right of": (dx, dy),
                             "above": (-dy, dx), "below": (dy, dx)}[scene.relation]
            assert along >= ra + rb + 0.09                  # separated, no overlap
            assert abs(across) <= 0.36 * along              # unambiguous axis
            assert S.relation_between((a.x, a.y), (b.x, b.y)) == scene.relation


def test_relation_between_known_values():
    assert S.relation_between((0.2, 0.5), (0.8, 0.5)) == "to the left of"
    assert S.relation_between((0.8, 0.4), (0.2, 0.5)) == "to the right of"
    assert S.relation_between((0.5, 0.1), (0.45, 0.9)) == "above"
    assert S.relation_between((0.5, 0.9), (0.55, 0.1)) == "below"


# --- captions and arrays --------------------------------------------------------------------

def test_caption_known_text_and_parse():
    scene = S.Scene((S.ShapeObject("red", "circle", "small", 0.2, 0.5),
                     S.ShapeObject("blue", "square", "big", 0.7, 0.5)), "to the left of")
    text = S.caption(scene)
    assert text == "a small red circle to the left of a big blue square"
    assert S.caption(S.Scene(scene.objects[:1])) == "a small red circle"
    assert S.parse_caption(text) == _strip_positions(scene)
    loose = S.parse_caption("  A red circle  above an orange cross. ")
    assert loose.objects[0].size is None and loose.objects[1].colour == "orange"
    assert loose.relation == "above"
    for bad in ("a red dog", "a small red circle next to a blue square", "red circle", ""):
        with pytest.raises(ValueError, match="cannot parse"):
            S.parse_caption(bad)


def test_caption_parse_round_trip_and_arrays_round_trip():
    for split in S.SPLITS:
        for i in range(200):
            scene = S.sample_scene(2, i, split)
            assert S.parse_caption(S.caption(scene)) == _strip_positions(scene)
            arrays = S.scene_to_arrays(scene)
            assert arrays["colour"].dtype == np.int32 and arrays["colour"].shape == (2,)
            back = S.arrays_to_scene(arrays)
            assert _same_attributes(back, scene)
            assert np.allclose([(o.x, o.y) for o in back.objects],
                               [(o.x, o.y) for o in scene.objects], atol=1e-6)
    one = S.scene_to_arrays(S.Scene((S.ShapeObject("white", "cross", "big", 0.5, 0.5),)))
    np.testing.assert_array_equal(one["colour"], [S.COLOURS.index("white"), -1])
    np.testing.assert_array_equal(one["shape"], [S.SHAPES.index("cross"), -1])
    np.testing.assert_array_equal(one["size"], [1, -1])
    assert one["num_objects"] == 1 and one["relation"] == -1


# --- rendering ------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_render_shape_dtype_and_known_pixels(resolution):
    scene = S.Scene((S.ShapeObject("green", "square", "big", 0.3, 0.3),
                     S.ShapeObject("yellow", "circle", "small", 0.75, 0.75)), "above")
    image = S.render(scene, resolution)
    assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, -1], S.BACKGROUND)          # empty corner
    c = int(0.3 * resolution)
    np.testing.assert_array_equal(image[c, c], S.PALETTE[S.COLOURS.index("green")])
    c = int(0.75 * resolution)
    np.testing.assert_array_equal(image[c, c], S.PALETTE[S.COLOURS.index("yellow")])
    # Anti-aliased: the square's edge pixels hold intermediate values only where the edge
    # does not fall on a pixel boundary; the circle always has some.
    green = S.PALETTE[S.COLOURS.index("green")]
    partial = ~np.all(image == S.BACKGROUND, -1) & ~np.all(image == green, -1) & \
        ~np.all(image == S.PALETTE[S.COLOURS.index("yellow")], -1)
    assert partial.sum() > 0


def test_render_coverage_is_area():
    # A big square at 64 px: half-side 0.16 * 64 = 10.24 px, area 20.48^2 px.
    image = S.render(S.Scene((S.ShapeObject("white", "square", "big", 0.5, 0.5),)), 64)
    alpha = (image[..., 0].astype(np.float64) - 20) / (240 - 20)
    assert abs(alpha.sum() - 20.48 ** 2) < 2.0


# --- judge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_objects,threshold", [(1, 0.99), (2, 0.97)])
def test_judge_accuracy_at_64px(num_objects, threshold):
    exact = [S.score(S.judge(S.render(scene, 64)), scene)["exact"]
             for scene in (S.sample_scene(11, i, "train", num_objects=num_objects)
                           for i in range(300))]
    assert np.mean(exact) >= threshold


def test_judge_reads_known_scene():
    scene = S.Scene((S.ShapeObject("purple", "triangle", "big", 0.25, 0.7),
                     S.ShapeObject("cyan", "cross", "small", 0.8, 0.3)), "to the left of")
    judged = S.judge(S.render(scene, 64))
    assert [(o.colour, o.shape, o.size) for o in judged.objects] == [
        ("purple", "triangle", "big"), ("cyan", "cross", "small")]
    assert abs(judged.objects[0].x - 0.25) < 0.02 and abs(judged.objects[0].y - 0.7) < 0.02
    assert judged.as_scene().relation == "to the left of"
    assert S.judge(np.full((64, 64, 3), 20, np.uint8)).num_objects == 0


def test_judge_tolerates_mild_noise():
    rng = np.random.default_rng(0)
    exact = []
    for i in range(100):
        scene = S.sample_scene(4, i, "validation")
        image = S.render(scene, 64).astype(np.float32) + rng.normal(0, 10, (64, 64, 3))
        exact.append(S.score(S.judge(np.clip(image, 0, 255).astype(np.uint8)), scene)["exact"])
    assert np.mean(exact) >= 0.95


def test_score_catches_wrong_attributes():
    scene = S.Scene((S.ShapeObject("red", "circle", "small", 0.2, 0.5),
                     S.ShapeObject("blue", "square", "big", 0.7, 0.5)), "to the left of")
    judged = S.judge(S.render(scene, 64))
    good = S.score(judged, scene)
    assert good["exact"] and good["all_objects_correct"] and good["relation_correct"]
    assert good["colour_shape_correct"] == [True, True]

    def wrong(**changes):
        objs = (dataclasses.replace(scene.objects[0], **changes), scene.objects[1])
        return S.score(judged, dataclasses.replace(scene, objects=objs))

    bad_colour = wrong(colour="green")
    assert bad_colour["colour_correct"] == [False, True]
    assert bad_colour["colour_shape_correct"] == [False, True]
    assert not bad_colour["exact"] and not bad_colour["all_objects_correct"]
    assert not wrong(shape="diamond")["exact"]
    bad_size = wrong(size="big")
    assert bad_size["all_objects_correct"] and not bad_size["exact"]
    bad_rel = S.score(judged, dataclasses.replace(scene, relation="to the right of"))
    assert not bad_rel["relation_correct"] and not bad_rel["exact"]
    # Order-independent: the same scene stated from the other object's side.
    flipped = S.Scene(scene.objects[::-1], "to the right of")
    assert S.score(judged, flipped)["exact"]
    # A missing object.
    single = S.judge(S.render(S.Scene(scene.objects[:1]), 64))
    missing = S.score(single, scene)
    assert not missing["num_objects_correct"] and missing["colour_shape_correct"][1] is False


def test_score_caption():
    scene = S.sample_scene(0, 3, "test", num_objects=2)
    image = S.render(scene, 64)
    assert S.score_caption(image, S.caption(scene))["exact"]
    a, b = scene.objects
    swapped = S.Scene((dataclasses.replace(a, colour=b.colour),
                       dataclasses.replace(b, colour=a.colour)), scene.relation)
    if a.colour != b.colour:                               # attribute binding error
        result = S.score_caption(image, S.caption(swapped))
        assert not result["all_objects_correct"]
    # A caption without sizes scores sizes as don't-care.
    text = f"a {a.colour} {a.shape} {scene.relation} a {b.colour} {b.shape}"
    assert S.score_caption(image, text)["exact"]


# --- TFDS builder ---------------------------------------------------------------------------

def test_build_tiny_dataset_and_read_back(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from unclip_jax.data.captioned_shapes import build_captioned_shapes, dataset_name

    sizes = dict(num_train=16, num_validation=8, num_test=8)
    data_dir = build_captioned_shapes(tmp_path, resolution=32, **sizes)
    assert data_dir == os.fspath(tmp_path)
    name = dataset_name(32, **sizes)
    for split, n in (("train", 16), ("validation", 8), ("test", 8)):
        source = tfds.data_source(name, data_dir=data_dir, split=split)
        assert len(source) == n
        for i in range(n):
            record = source[i]
            scene = S.sample_scene(0, i, split)
            assert record["index"] == i
            assert record["image"].dtype == np.uint8 and record["image"].shape == (32, 32, 3)
            np.testing.assert_array_equal(record["image"], S.render(scene, 32))
            assert record["caption"] == S.caption(scene).encode()
            arrays = S.scene_to_arrays(scene)
            for key in ("colour", "shape", "size", "num_objects", "relation"):
                np.testing.assert_array_equal(record[key], arrays[key])
            np.testing.assert_allclose(record["position"], arrays["position"])
    # A second call finds the build and does not rewrite it.
    files = sorted(p for p in tmp_path.rglob("*.array_record*"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    build_captioned_shapes(tmp_path, resolution=32, **sizes)
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_partial_caption_drops_attributes_but_never_invents_them():
    rng = np.random.default_rng(0)
    full = 0
    for i in range(200):
        scene = S.sample_scene(3, i, "train")
        arrays = S.scene_to_arrays(scene)
        text = S.partial_caption(arrays, rng, p=0.7)
        assert S.partial_caption(arrays, np.random.default_rng(i), p=0.0) == S.caption(scene)
        words = set(text.split())
        named = {w for o in scene.objects for w in (o.colour, o.shape, o.size)}
        vocab = set(S.COLOURS) | set(S.SHAPES) | set(S.SIZES)
        assert (words & vocab) <= named and words & vocab
        if scene.num_objects == 2:
            assert scene.relation in text
        full += text == S.caption(scene)
    assert 40 < full < 120   # about 30% untouched plus the subsets that keep everything
