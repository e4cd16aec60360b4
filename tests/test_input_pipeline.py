"""Input pipeline: shapes, determinism, exact resume, epochs, per-process slices, sharding."""

import dataclasses
import importlib
import importlib.util
import io

import jax
import numpy as np
import pytest
from PIL import Image

from unclip_jax.data.image_captions import build_image_captions
from unclip_jax.core.config import DataConfig
from unclip_jax.data.input_pipeline import Batches, FastExamples, make_batches, open_source
from unclip_jax.core.sharding import MeshConfig, make_mesh
from unclip_jax.core.text import Tokenizer

N = 20           # examples in the built dataset (train + validation)
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny image_captions dataset (stored at 16×16) and a tokenizer trained on its captions."""
    root = tmp_path_factory.mktemp("pipe")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    captions = []
    for i in range(N):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + i % 3, 24, 3), np.uint8)).save(buf, "PNG")
        (src / f"{i:02d}.png").write_bytes(buf.getvalue())
        captions.append(f"a {COLOURS[i % 4]} square number {i}")
        (src / f"{i:02d}.txt").write_text(captions[-1])
    data_dir, summary = build_image_captions(src, root / "prepared", "tiny", resolution=16,
                                             val_fraction=0.25)
    tok = Tokenizer.train(captions, root / "tok.model", 60)
    cfg = DataConfig(name="image_captions/tiny", data_dir=data_dir, image_size=16,
                     context_length=12)
    return cfg, tok, summary


def _eq(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def _same_examples(fast, slow):
    assert len(fast) == len(slow)
    for i in range(len(slow)):
        a, b = fast[i], slow[i]
        assert a.keys() == b.keys()
        for k in a:
            if np.ndim(b[k]):   # TFDS returns scalars as Python numbers
                assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
            np.testing.assert_array_equal(a[k], b[k])


def test_fast_decoder_matches_tfds(built):
    cfg, _, _ = built
    src = open_source(cfg, "train")
    assert isinstance(src, FastExamples)
    _same_examples(src, src.source)
    assert ([x["caption"] for x in src.__getitems__([2, 0])]
            == [src[2]["caption"], src[0]["caption"]])


def test_batch_shapes_dtypes_ranges(built):
    cfg, tok, summary = built
    it = make_batches(cfg, "train", batch_size=8, tokenizer=tok, mesh=None, train=True)
    b = next(it)
    assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["image"].std() > 0.3
    assert b["tokens"].shape == (8, 12) and b["tokens"].dtype == np.int32
    assert np.all(b["tokens"][:, 0] == tok.bos_id) and b["mask"].all()
    assert "caption" not in b
    assert it.position == 1
    caps = it.captions(0)
    assert len(caps) == 8 and all(c.startswith("a ") for c in caps)
    assert tok.decode(b["tokens"]) == [c.lower() for c in caps]
    # resize path (stored 16 → 12) and random crop
    small = dataclasses.replace(cfg, image_size=12, random_crop=True)
    b = next(make_batches(small, "train", batch_size=4, tokenizer=None, train=True))
    assert b["image"].shape == (4, 12, 12, 3) and "tokens" not in b
    b = next(make_batches(small, "validation", batch_size=4, tokenizer=None, train=False))
    assert b["image"].shape == (4, 12, 12, 3)


def test_determinism_and_resume(built):
    cfg, tok, _ = built
    for random_crop in (False, True):
        c = dataclasses.replace(cfg, random_crop=random_crop, image_size=12)
        a = make_batches(c, "train", batch_size=4, tokenizer=tok, train=True)
        first = [next(a) for _ in range(7)]
        b = make_batches(c, "train", batch_size=4, tokenizer=tok, train=True)
        for x in first:
            _eq(x, next(b))
        resumed = make_batches(c, "train", batch_size=4, tokenizer=tok, train=True, start=5)
        _eq(next(resumed), first[5])
        assert resumed.position == 6
        other = make_batches(dataclasses.replace(c, shuffle_seed=1), "train", batch_size=4,
                             tokenizer=tok, train=True)
        assert not np.array_equal(next(other)["image"], first[0]["image"])


def test_random_crop_varies_across_epochs(built):
    cfg, tok, _ = built
    it = Batches(open_source(cfg, "train"), batch_size=15, image_size=12, seed=0,
                 train=True, random_crop=True)
    n = it.num_examples
    assert n == 15
    e0, e1 = it.local_numpy(0, captions=True), it.local_numpy(1, captions=True)
    order0, order1 = list(e0["caption"]), list(e1["caption"])
    assert sorted(order0) == sorted(order1) and order0 != order1
    same = order1.index(order0[0])   # the same example in the next epoch, cropped differently
    assert not np.array_equal(e0["image"][0], e1["image"][same])


def test_epochs_cover_every_example_once(built):
    cfg, tok, summary = built
    src = open_source(cfg, "train")
    n = len(src)
    assert n == summary["train"]
    it = Batches(src, batch_size=5, image_size=16, seed=3, train=True)
    per_epoch = n // 5
    seen = [c for i in range(2 * per_epoch) for c in it.captions(i)]
    epoch0, epoch1 = seen[:n], seen[n:]
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == n
    assert epoch0 != epoch1   # a fresh permutation per epoch


def test_eval_is_finite_deterministic_and_masked(built):
    cfg, tok, summary = built
    n = summary["validation"]
    assert n == 5
    it = make_batches(cfg, "validation", batch_size=4, tokenizer=tok, train=False)
    batches = list(it)
    assert len(batches) == len(it) == 2
    assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
    caps = it.captions(0) + it.captions(1)
    assert len(set(caps[:n])) == n and caps[n:] == ["", "", ""]
    again = list(make_batches(cfg, "validation", batch_size=4, tokenizer=tok, train=False))
    for a, b in zip(batches, again):
        _eq(a, b)
    with pytest.raises(StopIteration):
        next(it)


def test_process_slices_concatenate(built):
    cfg, tok, _ = built
    src = open_source(cfg, "train")
    kw = dict(batch_size=8, image_size=12, tokenizer=tok, seed=0, train=True, random_crop=True)
    whole = Batches(src, **kw).local_numpy(3)
    parts = [Batches(src, process_index=p, process_count=2, **kw).local_numpy(3)
             for p in range(2)]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        Batches(src, process_index=0, process_count=3, **kw)


def test_mesh_sharding_and_errors(built):
    cfg, tok, _ = built
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, model=2))
    it = make_batches(cfg, "train", batch_size=8, tokenizer=tok, mesh=mesh, train=True)
    b = next(it)
    assert isinstance(b["image"], jax.Array) and b["image"].shape == (8, 16, 16, 3)
    assert b["image"].sharding.spec[0] == ("data", "fsdp")
    assert b["tokens"].sharding.spec[0] == ("data", "fsdp")
    _eq(jax.device_get(b), make_batches(cfg, "train", batch_size=8, tokenizer=tok,
                                        train=True).local_numpy(0))
    with pytest.raises(ValueError, match="not divisible by the mesh's data×fsdp size 4"):
        make_batches(cfg, "train", batch_size=6, tokenizer=tok, mesh=mesh, train=True)


def test_not_built_and_bad_split(built, tmp_path):
    cfg, _, _ = built
    missing = dataclasses.replace(cfg, name="image_captions/nope", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"has not been built.*image_captions/nope"):
        open_source(missing, "train")
    with pytest.raises(ValueError, match="no split 'test'; available: train, validation"):
        open_source(cfg, "test")


def test_workers_and_attribute_passthrough():
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (10, 10, 3), np.uint8), "caption": f"c{i}".encode(),
               "colour": np.array([i, i + 1], np.int32), "num_objects": np.int32(1 + i % 2),
               "position": np.full((2, 2), i / 10, np.float32)} for i in range(13)]
    kw = dict(batch_size=4, image_size=8, seed=1, train=True, random_crop=True)
    plain = Batches(source, **kw)
    threaded = Batches(source, num_workers=3, **kw)
    for _ in range(6):
        _eq(next(plain), next(threaded))
    threaded.close()
    b = plain.local_numpy(0, captions=True)
    assert b["colour"].shape == (4, 2) and b["colour"].dtype == np.int32
    assert b["num_objects"].shape == (4,) and b["position"].dtype == np.float32
    idx = [int(c[1:]) for c in b["caption"]]
    np.testing.assert_array_equal(b["colour"][:, 0], idx)


def test_captioned_shapes_batches(shapes_data):
    cfg = shapes_data                                  # the shared 16 px build
    src = open_source(cfg, "train")
    assert isinstance(src, FastExamples)
    _same_examples(src, src.source)
    b = next(make_batches(cfg, "train", batch_size=4, train=True))
    assert b["image"].shape == (4, 16, 16, 3)
    for key in ("colour", "shape", "size"):
        assert b[key].shape == (4, 2) and b[key].dtype == np.int32
    assert b["num_objects"].shape == (4,) and b["relation"].shape == (4,)


def test_importable_without_tensorflow():
    assert importlib.util.find_spec("tensorflow") is None
