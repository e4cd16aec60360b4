"""Metric writers: the TensorBoard event file holds what metrics.jsonl holds (read back with
tensorboardX's protobufs), images go to TensorBoard, only process 0 writes, W&B only on demand."""

import json
import struct
import sys
import types

import numpy as np
import pytest

from unclip_jax.train.writers import MetricWriters, check_writers


def read_events(logdir):
    """Every Event of the event files under ``logdir`` (TFRecord framing: length, crc, data,
    crc), parsed with tensorboardX's Event protobuf."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack("<Q", raw[pos:pos + 8])
            events.append(Event.FromString(raw[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
    return events


def scalars(events) -> dict[tuple[int, str], float]:
    return {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value
            if v.WhichOneof("value") == "simple_value"}


def test_tensorboard_holds_the_jsonl_scalars_and_images(tmp_path):
    w = MetricWriters(tmp_path, ("tensorboard",))
    rng = np.random.default_rng(0)
    for step in (1, 2, 3):
        w.scalars(step, {"loss": float(rng.normal()), "lr": 1e-3 * step, "skipped": 0})
    w.scalars(3, {"eval/acc": 0.5})
    w.images(3, {"samples": rng.integers(0, 256, (8, 12, 3), np.uint8)})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = {(r["step"], k): v for r in rows for k, v in r.items() if k != "step"}
    events = read_events(tmp_path / "tensorboard")
    got = scalars(events)
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-6), key      # float32 in the event file
    images = [(e.step, v.tag, v.image) for e in events for v in e.summary.value
              if v.WhichOneof("value") == "image"]
    assert [(s, t) for s, t, _ in images] == [(3, "samples")]
    assert (images[0][2].height, images[0][2].width) == (8, 12)


def test_resume_purges_later_events_and_truncates_the_log(tmp_path):
    w = MetricWriters(tmp_path, ("tensorboard",))
    for step in range(1, 6):
        w.scalars(step, {"loss": float(step)})
    w.close()
    w = MetricWriters(tmp_path, ("tensorboard",), start_step=3)    # resumed from step 3
    w.scalars(4, {"loss": 40.0})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    events = read_events(tmp_path / "tensorboard")
    # the second file starts with a session START at step 3: TensorBoard drops steps ≥ 3 of
    # the earlier file
    from tensorboardX.proto.event_pb2 import SessionLog

    starts = [e.step for e in events if e.HasField("session_log")
              and e.session_log.status == SessionLog.START]
    assert starts == [3]


def test_only_process_zero_writes(tmp_path):
    w = MetricWriters(tmp_path, ("tensorboard",), main=False)
    w.scalars(1, {"loss": 1.0})
    w.images(1, {"x": np.zeros((4, 4, 3), np.uint8)})
    w.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_writer_and_missing_wandb(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="accepted: tensorboard, wandb"):
        check_writers(("tensorbored",))
    monkeypatch.setitem(sys.modules, "wandb", None)         # not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricWriters(tmp_path, ("wandb",))


def test_wandb_gets_scalars_and_images_when_asked(tmp_path, monkeypatch):
    """A stand-in ``wandb`` module records the calls (the real one needs an account)."""
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or Run(),
        Image=lambda arr: ("image", arr.shape),
        util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    w = MetricWriters(tmp_path, ("wandb",), run_name="r", config={"a": 1}, wandb_project="p")
    w.scalars(2, {"loss": 0.5})
    w.images(2, {"grid": np.zeros((4, 4, 3), np.uint8)})
    w.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p"
    assert calls[0][1]["id"] == "abc123" and calls[0][1]["resume"] == "allow"
    assert calls[1] == ("log", 2, {"loss": 0.5})
    assert calls[2] == ("log", 2, {"grid": ("image", (4, 4, 3))}) and calls[3] == ("finish",)
    assert not (tmp_path / "tensorboard").exists()
