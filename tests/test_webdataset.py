"""Webdataset (img2dataset) tar shards: listing, streaming per reader, exact resume, bad input,
evaluation by random access (== the ArrayRecord path), and the loop's skip counts."""

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from unclip_jax.core import config as config_lib
from unclip_jax.core.config import DataConfig
from unclip_jax.data import shards
from unclip_jax.data.input_pipeline import (STREAM_FIELDS, Batches, ShardStream, StreamBatches,
                                       make_batches, open_source)

NUM_SHARDS, PER_SHARD = 8, 6
MODES = ("RGB", "L", "RGBA", "P", "CMYK", "I;16")


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def sample_image(s: int, i: int) -> Image.Image:
    """Mixed sizes and modes: sample i of shard s."""
    rng = np.random.default_rng((s, i))
    h, w = 18 + (i % 3) * 5, 20 + (s % 4) * 3
    arr = rng.integers(0, 256, (h, w, 3), np.uint8)
    img = Image.fromarray(arr)
    mode = MODES[(s + i) % len(MODES)]
    if mode == "I;16":
        return Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    return img.convert(mode) if mode != "RGB" else img


def members(s: int, i: int, fmt: str = "png") -> dict[str, bytes]:
    key = f"{s:05d}{i:04d}"
    img = sample_image(s, i)
    if img.mode == "CMYK":                        # only JPEG stores CMYK
        fmt = "jpg"
    elif fmt == "jpg" and img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    elif fmt == "webp" and img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGB")
    data = encode(img, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt])
    cap = f"sample {s} {i}"
    return {f"{key}.{fmt}": data, f"{key}.txt": cap.encode(),
            f"{key}.json": json.dumps({"key": key, "caption": cap}).encode()}


def write_tar(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """8 shards × 6 samples (png, jpg, webp members; 6 modes; 3×4 sizes), img2dataset names."""
    root = tmp_path_factory.mktemp("wds")
    for s in range(NUM_SHARDS):
        files = {}
        for i in range(PER_SHARD):
            files.update(members(s, i, ("png", "jpg", "webp")[i % 3]))
        write_tar(root / f"{s:05d}.tar", files)
    return root


def stream(urls, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", 16)
    kw.setdefault("shuffle_buffer", 4)
    return StreamBatches(urls, **kw)


def rows(batch):
    return list(zip(batch["shard"].tolist(), batch["offset"].tolist()))


# ----------------------------------------------------------------------------- listing


def test_patterns_glob_brace_and_fsspec(good):
    urls = shards.expand_shards(str(good / "*.tar"))
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"{s:05d}.tar" for s in range(NUM_SHARDS)]
    assert shards.expand_shards(str(good / "{00000..00007}.tar")) == urls
    assert shards.expand_shards(f"{good}/{{00000..00003}}.tar::{good}/0000[4-7].tar") == urls
    via_fsspec = shards.expand_shards(f"file://{good}/*.tar")
    assert len(via_fsspec) == NUM_SHARDS and all(u.startswith("file://") for u in via_fsspec)
    a = next(stream(urls[:2], batch_size=2, shuffle_buffer=3))
    b = next(stream(via_fsspec[:2], batch_size=2, shuffle_buffer=3))
    np.testing.assert_array_equal(a["image"], b["image"])


def test_memory_filesystem_url(good):
    import fsspec

    fs = fsspec.filesystem("memory")
    for s in range(2):
        fs.pipe(f"/wds_test/{s:05d}.tar", (good / f"{s:05d}.tar").read_bytes())
    urls = shards.expand_shards("memory://wds_test/*.tar")
    assert len(urls) == 2
    b = next(stream(urls, batch_size=4))
    assert b["image"].shape == (4, 16, 16, 3)


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"matches no file.*brace"):
        shards.expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        shards.expand_shards(str(tmp_path / "{00000..00003}.tar"))
    cfg = DataConfig(shards=str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        make_batches(cfg, "train", batch_size=4, train=True)


# ----------------------------------------------------------------------------- streaming


def test_batches_mixed_sizes_and_modes_are_rgb_at_the_size(good):
    urls = shards.expand_shards(str(good / "*.tar"))
    it = stream(urls, batch_size=12, image_size=16)
    seen_modes = set()
    for _ in range(4):
        b = next(it)
        assert b["image"].shape == (12, 16, 16, 3) and b["image"].dtype == np.float32
        assert -1 <= b["image"].min() and b["image"].max() <= 1 and b["mask"].all()
        for s, i in rows(b):
            seen_modes.add(MODES[(s + i) % len(MODES)])
    assert seen_modes == set(MODES)
    # a grey (L) sample is grey in all three channels; its pixels are the resized original's
    b = next(stream(urls, batch_size=PER_SHARD * NUM_SHARDS, image_size=16))
    for img, (s, i) in zip(b["image"], rows(b)):
        if i % 3 == 0 and MODES[(s + i) % len(MODES)] in ("L", "I;16"):   # png, lossless grey
            np.testing.assert_array_equal(img[..., 0], img[..., 1])
            np.testing.assert_array_equal(img[..., 0], img[..., 2])
        if i % 3 == 0 and MODES[(s + i) % len(MODES)] == "RGB":
            from unclip_jax.core.images import resize_center_crop

            want = np.asarray(resize_center_crop(sample_image(s, i), 16), np.float32)
            np.testing.assert_allclose(img, want * (2 / 255) - 1, atol=1e-6)


def test_each_epoch_reads_every_sample_once_split_over_processes_and_workers(good):
    """2 processes × 2 workers: in every epoch each process reads only its shards (a fresh
    seeded deal of the shards each epoch), each reader all of its shards' samples once, and
    the union is every sample once."""
    urls = shards.expand_shards(str(good / "*.tar"))
    total = NUM_SHARDS * PER_SHARD
    epochs = []                                   # epochs[p][e]: process p's rows of epoch e
    for p in range(2):
        it = stream(urls, batch_size=8, process_index=p, process_count=2, num_workers=2,
                    shuffle_buffer=4)
        epochs.append([[r for _ in range(total // 8) for r in rows(next(it))]
                       for _ in range(2)])
        it.close()
    everything = {(s, i) for s in range(NUM_SHARDS) for i in range(PER_SHARD)}
    for e in range(2):
        mine = [epochs[p][e] for p in range(2)]
        assert all(len(m) == len(set(m)) == total // 2 for m in mine)
        shards_of = [{s for s, _ in m} for m in mine]
        assert not shards_of[0] & shards_of[1]                # disjoint shards
        assert set(mine[0]) | set(mine[1]) == everything
    assert epochs[0][0] != epochs[0][1]                       # reshuffled


def test_one_process_two_workers_is_two_processes_one_worker(good):
    """Reader r is the same stream whoever runs it: 1 process × 2 workers gives process r of
    2 (1 worker each) the rows of reader r."""
    urls = shards.expand_shards(str(good / "*.tar"))
    one = stream(urls, batch_size=8, num_workers=2, random_crop=True, image_size=12)
    single = [next(one) for _ in range(5)]
    one.close()
    for p in range(2):
        it = stream(urls, batch_size=8, process_index=p, process_count=2, random_crop=True,
                    image_size=12)
        for b1 in single:
            b2 = next(it)
            np.testing.assert_array_equal(b2["image"], b1["image"][p::2])
            assert rows(b2) == rows(b1)[p::2]


def test_resume_from_state_equals_uninterrupted(good):
    urls = shards.expand_shards(str(good / "*.tar"))
    for workers, crop in ((0, False), (2, True)):
        kw = dict(batch_size=6, num_workers=workers, random_crop=crop, shuffle_buffer=5,
                  image_size=12)
        a = stream(urls, **kw)
        first = [next(a) for _ in range(3)]
        state = json.loads(json.dumps(a.state()))              # what the checkpoint holds
        rest = [next(a) for _ in range(9)]                     # crosses an epoch boundary
        a.close()
        assert state["position"] == 3 and state["fields"] == list(STREAM_FIELDS)
        assert len(state["streams"]) == max(workers, 1)
        b = stream(urls, start=3, **kw)
        with pytest.raises(ValueError, match="needs the readers' positions"):
            next(b)
        b = stream(urls, start=3, **kw)
        b.restore(state)
        for want in rest:
            got = next(b)
            assert rows(got) == rows(want)
            np.testing.assert_array_equal(got["image"], want["image"])
        assert b.position == 12
        b.close()
        other = stream(urls, seed=1, **kw)
        assert rows(next(other)) != rows(first[0])
        with pytest.raises(ValueError, match=r"2 process\(es\) × .* this run has 1 ×"):
            c = stream(urls, **kw)
            c.restore({**state, "readers": [2, max(workers, 1)]})


def test_fewer_shards_than_readers_names_both_numbers(good):
    urls = shards.expand_shards(str(good / "*.tar"))[:3]
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 process\(es\) × 2 loader "
                                         r"worker\(s\) = 4 readers"):
        stream(urls, batch_size=4, process_index=0, process_count=2, num_workers=2)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad(tmp_path_factory, good):
    """Shard 0: good; 1: a sample with no caption, one with no image, one undecodable image;
    2: truncated after 2 samples; 3: not a tar."""
    root = tmp_path_factory.mktemp("bad")
    (root / "00000.tar").write_bytes((good / "00000.tar").read_bytes())
    files = {}
    for i in range(PER_SHARD):
        m = members(1, i)
        if i == 1:
            m = {k: v for k, v in m.items() if not k.endswith(".txt")}
        image = (".png", ".jpg", ".webp")
        if i == 2:
            m = {k: v for k, v in m.items() if not k.endswith(image)}
        if i == 3:
            m = {k: (b"\x89PNG not really" if k.endswith(image) else v) for k, v in m.items()}
        files.update(m)
    write_tar(root / "00001.tar", files)
    whole = (good / "00002.tar").read_bytes()
    # cut inside the third sample's image: 2 samples are whole
    with tarfile.open(good / "00002.tar") as tar:
        third = next(m for m in tar.getmembers() if m.name.startswith("000020002.")
                     and not m.name.endswith((".txt", ".json")))
        cut = third.offset_data + 10
    (root / "00002.tar").write_bytes(whole[:cut])
    (root / "00003.tar").write_bytes(b"this is not a tar file\n" * 40)
    return root


def test_bad_samples_and_shards_are_skipped_and_counted(bad):
    """Read in order (a one-sample shuffle buffer): the usable samples of each epoch come out,
    and the counts are exactly the bad items read so far (closed form from the shard order)."""
    import collections

    urls = shards.expand_shards(str(bad / "*.tar"))
    events = {0: ["ok"] * PER_SHARD,
              1: ["ok", "no_caption", "no_image", "undecodable", "ok", "ok"],
              2: ["ok", "ok", "bad_shard"], 3: ["bad_shard"]}
    usable = {(sh, k) for sh, evs in events.items() for k, ev in enumerate(evs) if ev == "ok"}
    s = ShardStream(urls, 0, 1, buffer=1, seed=0)
    for epoch in range(2):
        got = [s.next() for _ in range(len(usable))]
        assert {(g[2], g[3]) for g in got} == usable and len(got) == len(usable)
        for img, caption, *_ in got:
            assert img.ndim == 3 and img.shape[2] == 3 and caption.startswith("sample ")
        seq = [ev for e in range(epoch + 1) for sh in s.shard_order(e) for ev in events[sh]]
        read = seq[:max(i for i, ev in enumerate(seq) if ev == "ok")]   # up to the last usable
        want = collections.Counter(ev for ev in read if ev != "ok")
        assert s.skipped == {r: want[r] for r in shards.SKIP_REASONS}, (epoch, seq)
    assert s.shard_order(0) != s.shard_order(1)


def test_only_bad_shards_fail_naming_them(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"garbage")
    write_tar(tmp_path / "00001.tar", {"000000000.txt": b"a caption, no image"})
    urls = shards.expand_shards(str(tmp_path / "*.tar"))
    it = stream(urls, batch_size=2)
    with pytest.raises(ValueError, match="no usable sample in a whole epoch"):
        next(it)


def test_eval_split_reads_by_random_access_and_masks_undecodable(bad):
    cfg = DataConfig(shards=str(bad / "0000[01].tar"), eval_shards=str(bad / "*.tar"),
                     image_size=16)
    src = open_source(cfg, "validation")
    assert len(src) == PER_SHARD + 4 + 2                   # the undecodable one is indexed
    assert src.skipped == {"no_image": 1, "no_caption": 1, "undecodable": 0, "bad_shard": 2}
    it = make_batches(cfg, "validation", batch_size=4, train=False)
    assert isinstance(it, Batches) and it.num_batches == 3
    masks = np.concatenate([b["mask"] for b in it])
    assert masks.sum() == PER_SHARD + 3 + 2 and masks.size == 12   # undecodable + 1 padding
    with pytest.raises(ValueError, match="data.eval_shards"):
        make_batches(dataclasses.replace(cfg, eval_shards=""), "validation", batch_size=4,
                     train=False)


def test_eval_batches_equal_the_arrayrecord_path(good, tmp_path):
    """The same PNG images and captions through an image_captions build (ArrayRecord) and
    through shards: identical model inputs, caption by caption."""
    from unclip_jax.data.image_captions import build_image_captions

    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for i in range(PER_SHARD):
        m = members(5, i, "png")
        files.update(m)
        for name, data in m.items():
            if not name.endswith(".json"):
                (src / name).write_bytes(data)
    write_tar(tmp_path / "00000.tar", files)
    data_dir, _ = build_image_captions(src, tmp_path / "prepared", "same", resolution=16,
                                       val_fraction=0.0)
    ar = DataConfig(name="image_captions/same", data_dir=data_dir, image_size=16)
    wds = DataConfig(shards=str(tmp_path / "00000.tar"), image_size=16)
    by_caption = []
    for cfg in (ar, wds):
        it = make_batches(cfg, "train", batch_size=PER_SHARD, train=False)
        b = it.local_numpy(0, captions=True)
        by_caption.append({str(c): img for c, img in zip(b["caption"], b["image"])})
    assert by_caption[0].keys() == by_caption[1].keys() and len(by_caption[0]) == PER_SHARD
    for c in by_caption[0]:
        np.testing.assert_array_equal(by_caption[0][c], by_caption[1][c])


# ----------------------------------------------------------------------------- the loop


def test_loop_resumes_a_shard_stream_exactly_and_logs_skips(bad, tmp_path):
    """A toy model trained on shard batches: killed and resumed == uninterrupted (params and
    logged rows), and the skipped samples are in the metrics."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from unclip_jax.core.sharding import MeshConfig
    from unclip_jax.train import loop
    from unclip_jax.train.checkpoint import Checkpointer

    data = DataConfig(shards=str(bad / "*.tar"), image_size=8, shuffle_buffer=3,
                      num_workers=1)

    def make_task():
        model = nn.Dense(1)

        def loss(params, batch, rng):
            x = batch["image"].mean(axis=(1, 2))
            pred = model.apply({"params": params}, x)[:, 0]
            mse = jnp.mean((pred - x[:, 0] * 2.0) ** 2)
            return mse, {"mse": mse}

        def batches(start, mesh):
            return make_batches(data, "train", batch_size=4, mesh=mesh, train=True, start=start)

        return loop.Task(init=lambda rng, b: model.init(rng, b["image"].mean(axis=(1, 2))),
                         loss=loss, batches=batches,
                         example={"image": np.zeros((4, 8, 8, 3), np.float32)})

    cfg = config_lib.ExperimentConfig(
        name="toy", model=None, data=data,
        train=config_lib.TrainConfig(batch_size=4, steps=9, log_every=1, eval_every=0,
                                     ckpt_every=3, keep_checkpoints=5),
        optim=config_lib.OptimConfig(learning_rate=1e-2, warmup_steps=1, grad_clip=0.0),
        mesh=MeshConfig(data=1, fsdp=1, model=1))
    full = loop.train(cfg, make_task(), tmp_path / "a", progress=False)
    loop.train(cfg, make_task(), tmp_path / "b", stop_after=5, progress=False)
    assert Checkpointer(tmp_path / "b").latest_step() == 3
    resumed = loop.train(cfg, make_task(), tmp_path / "b", progress=False)
    for x, y in zip(jax.tree.leaves(jax.device_get(full)), jax.tree.leaves(
            jax.device_get(resumed)), strict=True):
        np.testing.assert_array_equal(x, y)

    def log(d):
        out = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in out]

    assert log(tmp_path / "a") == log(tmp_path / "b")
    last = log(tmp_path / "a")[-1]
    # the TensorBoard event file beside metrics.jsonl holds the same scalars
    from test_writers import read_events, scalars

    events = scalars(read_events(tmp_path / "a" / "tensorboard"))
    rows = [json.loads(line)
            for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert events == pytest.approx({(r["step"], k): v for r in rows for k, v in r.items()
                                    if k != "step"}, rel=1e-6)
    # 9 steps × 4 rows = 36 samples > one epoch (11 usable): every bad one was met
    assert last["data/skipped_no_image"] >= 1 and last["data/skipped_no_caption"] >= 1
    assert last["data/skipped_undecodable"] >= 1 and last["data/skipped_bad_shard"] >= 2
