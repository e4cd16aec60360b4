"""Reliability: Inf guard, determinism, and bad inputs that must fail with a clear message.

Extends tests/test_train_loop.py (its toy regression task is reused) — the kill-anywhere check
of real CLI runs is ``benchmarks/bench_kill_resume.py``.
"""

import errno
import io
import json
import os
import struct
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from test_train_loop import Batches, make_cfg
from test_train_loop import make_task as toy_task

from unclip_jax.core import sharding
from unclip_jax.core.diffusion import make_sampler, make_schedule, respace, sample
from unclip_jax.core.images import ImageLoadError, load_image
from unclip_jax.train import loop
from unclip_jax.train.checkpoint import Checkpointer, CheckpointWriteError

# ----------------------------------------------------------------------------- non-finite guard


class PoisonedBatches(Batches):
    """The toy batches plus ``poison [B]``: ``value`` in row 0 of batch ``at``, 0 elsewhere."""

    def __init__(self, start, at, value):
        super().__init__(start)
        self.at, self.value = at, value

    def make(self, i):
        b = super().make(i)
        b["poison"] = np.zeros(self.batch_size, np.float32)
        if i == self.at:
            b["poison"][0] = self.value
        return b


def poisoned_task(at, value, where):
    """``where="loss"``: loss + stop_gradient(Σ poison) — the loss is ±Inf, gradients finite.
    ``where="both"``: loss · (1 + Σ poison) — the gradients are non-finite too."""
    base = toy_task()

    def loss(params, batch, rng):
        mse, metrics = base.loss(params, batch, rng)
        p = jnp.sum(batch["poison"])
        out = mse + jax.lax.stop_gradient(p) if where == "loss" else mse * (1.0 + p)
        return out, metrics

    return loop.Task(init=base.init, loss=loss,
                     batches=lambda start, mesh: PoisonedBatches(start, at, value),
                     example=PoisonedBatches(0, at, value).make(0))


def test_inf_loss_with_finite_gradients_stops_then_skip_counts_it(tmp_path, capsys):
    with pytest.raises(loop.NonFiniteError,
                       match=r"at step 6 \(loss = inf, gradients finite\); stopped without "
                             r"saving — the last good checkpoint \(step 4\) is untouched"):
        loop.train(make_cfg(), poisoned_task(5, np.inf, "loss"), tmp_path / "stop",
                   progress=False)
    assert Checkpointer(tmp_path / "stop").latest_step() == 4

    state = loop.train(make_cfg(on_nonfinite="skip"), poisoned_task(5, -np.inf, "loss"),
                       tmp_path / "skip", progress=False)
    assert int(state.step) == 12 and int(state.skipped) == 1
    assert "step 6: non-finite update skipped (loss = -inf, gradients finite)" in (
        capsys.readouterr().out)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state)))
    rows = [json.loads(r) for r in (tmp_path / "skip/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 1]       # logged at steps 4, 8, 12


def test_inf_loss_and_gradients_skip_names_the_leaf(tmp_path, capsys):
    state = loop.train(make_cfg(on_nonfinite="skip", steps=8), poisoned_task(2, np.inf, "both"),
                       tmp_path, progress=False)
    assert int(state.skipped) == 1
    assert "step 3: non-finite update skipped (first non-finite gradient leaf: Dense_" in (
        capsys.readouterr().out)


# ----------------------------------------------------------------------------- determinism


def _curve(workdir):
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]


def test_same_seed_same_curve_and_a_resumed_run_logs_the_same_curve(tmp_path):
    """Two runs with one seed log the same values bit for bit. Rows a killed run logged after
    its last checkpoint (and a torn last line) are dropped on resume, so the resumed run's
    metrics.jsonl equals the uninterrupted run's too."""
    cfg = make_cfg(steps=8, log_every=1, ckpt_every=4)
    for name in ("a", "b"):
        loop.train(cfg, toy_task(), tmp_path / name, progress=False)
    a = _curve(tmp_path / "a")
    assert len(a) == 8 and a == _curve(tmp_path / "b")
    assert len({r["loss"] for r in a}) == 8                     # a real, moving curve
    loop.train(cfg, toy_task(), tmp_path / "cut", stop_after=6, progress=False)
    with open(tmp_path / "cut/metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                               # killed mid-write
    loop.train(cfg, toy_task(), tmp_path / "cut", progress=False)
    assert _curve(tmp_path / "cut") == a


class TinyDenoiser(nn.Module):
    @nn.compact
    def __call__(self, x, t, cond):
        h = jnp.concatenate([x, cond, jnp.sin(t[:, None] / 100.0)], -1)
        return nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(16)(h)))


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.7)])
def test_sampling_does_not_depend_on_batch_sharding(method, eta):
    """The shared jitted sampler (guided, with per-step noise) gives the same samples on 8
    devices with the batch sharded as on one device."""
    assert len(jax.devices()) == 8
    model, b, d = TinyDenoiser(), 16, 4
    cond = jax.random.normal(jax.random.key(1), (b, 3))
    params = model.init(jax.random.key(0), jnp.zeros((b, d)), jnp.zeros((b,), jnp.int32), cond)
    denoiser = lambda p, x, t, c: model.apply(p, x, t, c)  # noqa: E731
    sched = respace(make_schedule("cosine", 1000), 8)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    outs = {}
    for n_dev, shard in ((8, NamedSharding(mesh, P(("data", "fsdp"), None))), (1, None)):
        s = make_sampler(denoiser, schedule=sched, shape=(b, d), method=method,
                         batch_sharding=shard)
        outs[n_dev] = s(params, cond, jnp.zeros_like(cond), jax.random.key(2),
                        guidance_scale=3.0, eta=eta)
    assert len(outs[8].sharding.device_set) == 8
    assert float(jnp.std(outs[1])) > 0.1
    np.testing.assert_allclose(np.asarray(outs[8]), np.asarray(outs[1]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad inputs


def test_workdir_under_a_regular_file_is_a_clear_error(tmp_path):
    """Tests run as root, where chmod blocks nothing: a workdir *under a regular file* can
    never be created, whoever runs."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    for workdir in (blocker / "run", blocker):
        with pytest.raises(PermissionError, match=rf"cannot create the workdir {workdir}: "
                                                  rf"{blocker} is a file, not a folder"):
            loop.train(make_cfg(), toy_task(), workdir, progress=False)


def test_workdir_without_write_permission_is_a_clear_error(tmp_path, monkeypatch):
    """Simulated two ways: ``os.access`` saying no (a normal user on a read-only folder), and
    the write probe failing with EROFS (root on a read-only mount, where os.access says yes)."""
    workdir = tmp_path / "ro"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if os.path.abspath(p) == str(workdir) else real_access(p, mode, **kw)))
    with pytest.raises(PermissionError, match=rf"the workdir {workdir} is not writable "
                                              r"\(no write permission\)"):
        loop.train(make_cfg(), toy_task(), workdir, progress=False)
    monkeypatch.setattr(os, "access", real_access)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(PermissionError, match=rf"the workdir {workdir} is not writable "
                                              r"\(Read-only file system\)"):
        loop.train(make_cfg(), toy_task(), workdir, progress=False)
    assert not (workdir / "checkpoints").exists()


def test_disk_full_mid_checkpoint_stops_clearly_and_keeps_the_previous_one(tmp_path,
                                                                           monkeypatch):
    """ENOSPC raised inside orbax while the step-8 checkpoint is being written (its state is
    already in flight in the background): the run stops naming the step, the cause and the
    last complete checkpoint, which restores; the half-written step is never picked up, and a
    re-run resumes from step 4 to the end."""
    real_save = ocp.JsonCheckpointHandler._save_fn

    async def disk_full(self, x, directory):
        if isinstance(x, dict) and x.get("position") == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await real_save(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(CheckpointWriteError,
                       match=r"could not write checkpoint step 8 under .*/checkpoints: No space "
                             r"left on device \(ENOSPC\)\. .*last complete checkpoint is step 4 "
                             r"and is intact — free some disk space, then re-run"):
        loop.train(make_cfg(), toy_task(), tmp_path, progress=False)
    assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path / "checkpoints"))
    ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 4 and ck.all_steps() == [4]    # the half-written 8 is ignored
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ck.restore_params(4)))
    ck.close()

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", real_save)
    state = loop.train(make_cfg(), toy_task(), tmp_path, progress=False)
    assert int(state.step) == 12 and Checkpointer(tmp_path).all_steps() == [4, 8, 12]
    # A committed folder missing an item (e.g. a copy cut short) is not a resume point either.
    (tmp_path / "checkpoints/12/data/metadata").unlink()
    assert Checkpointer(tmp_path).latest_step() == 8


def _gauss(params, x, t, cond):
    return jnp.zeros_like(x)


@pytest.mark.parametrize("kwargs,message", [
    (dict(eta=-0.1), r"eta must be ≥ 0 .*got -0\.1"),
    (dict(eta=-1.0, method="ddpm"), r"eta must be ≥ 0"),
    (dict(guidance_scale=-2.0, uncond=jnp.zeros((2, 1))), r"guidance_scale must be ≥ 0"),
])
def test_sampler_rejects_bad_settings(kwargs, message):
    sched = respace(make_schedule("cosine", 100), 4)
    args = dict(schedule=sched, rng=jax.random.key(0), shape=(2, 3), cond=jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match=message):
        sample(_gauss, None, **{**args, **kwargs})


@pytest.mark.parametrize("steps,message", [
    (0, r"respacing '0': the number of sampling steps must be ≥ 1"),
    (-3, r"the number of sampling steps must be ≥ 1"),
    ("ddim0", r"the number of sampling steps must be ≥ 1"),
    (101, r"asks for 101 sampling steps, more than the schedule's T = 100 timesteps"),
    ("ddim500", r"more than the schedule's T = 100"),
])
def test_sampling_steps_out_of_range(steps, message):
    with pytest.raises(ValueError, match=message):
        respace(make_schedule("cosine", 100), steps)


def test_jitted_sampler_rejects_negative_eta_before_running():
    s = make_sampler(_gauss, schedule=respace(make_schedule("cosine", 100), 4), shape=(2, 3),
                     guidance=False)
    with pytest.raises(ValueError, match=r"eta must be ≥ 0"):
        s(None, jnp.zeros((2, 1)), None, jax.random.key(0), eta=-0.5)
    assert s.jitted._cache_size() == 0


@pytest.fixture(scope="module")
def tok(shapes_tokenizer):
    return shapes_tokenizer


@pytest.mark.parametrize("prompt", ["", " ", "\t\n  \r", "\u3000\u00a0\u2003", b"  \n"])
def test_whitespace_only_prompt_encodes_to_bos_eos(tok, prompt):
    """Defined behaviour: a prompt of only whitespace (any Unicode space) is the empty prompt,
    ``[BOS, EOS, pad…]`` — the unconditional-looking input, never an error or an UNK."""
    row = tok.encode([prompt], 8)[0]
    assert row.tolist() == [tok.bos_id, tok.eos_id] + [tok.pad_id] * 6
    assert tok.decode(row) == ""


def _bmp_header(w, h, bpp=24):
    """A BMP file header + BITMAPINFOHEADER claiming ``w``×``h`` and no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, bpp, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def _jpeg_claiming(w, h):
    """A valid tiny JPEG whose SOF0 frame header is patched to claim ``w``×``h``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


@pytest.mark.parametrize("kind", ["bmp", "jpeg"])
def test_huge_image_is_refused_from_its_header(tmp_path, kind):
    """A 20000×20000 (also 20000×5000, 65000×30000) claim is refused before decoding, with the
    pixel count in the message (the PNG case is in tests/test_image_captions.py)."""
    for w, h in ((20000, 20000), (20000, 5000), (65000, 30000)):
        data = _bmp_header(w, h) if kind == "bmp" else _jpeg_claiming(w, h)
        path = tmp_path / f"huge.{kind}"
        path.write_bytes(data)
        for src in (path, data):
            # The loader's own check ("too large: WxH = N pixels exceeds the limit of M") or,
            # past twice PIL's limit, PIL's bomb guard at open ("Image size (N pixels) ...").
            with pytest.raises(ImageLoadError, match=rf"too large.*\b{w * h} pixels") as e:
                load_image(src)
            assert e.value.kind == "too large"
    assert load_image(_jpeg_claiming(8, 8)).size == (8, 8)     # the unpatched image is fine
