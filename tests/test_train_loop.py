"""The generic loop on a toy regression task: resume exactness, non-finite guard, mismatches."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core import config as config_lib
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.train import loop, optim
from unclip_jax.train.checkpoint import Checkpointer, CheckpointMismatchError


class MLP(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x):
        dense = lambda n, names: nn.Dense(  # noqa: E731
            n, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names))
        h = jax.nn.gelu(dense(self.width, ("embed", "mlp"))(x))
        return dense(1, ("mlp", "embed"))(h)[..., 0]


class Batches:
    """Batch i is a pure function of i; ``position`` counts batches produced."""

    def __init__(self, start, batch_size=8, nan_at=None):
        self.position, self.batch_size, self.nan_at = start, batch_size, nan_at

    def make(self, i):
        rng = np.random.default_rng(i)
        x = rng.normal(size=(self.batch_size, 4)).astype(np.float32)
        y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)).astype(np.float32)
        if self.nan_at is not None and i == self.nan_at:
            x[0, 0] = np.nan
        return {"x": x, "y": y}

    def __next__(self):
        b = self.make(self.position)
        self.position += 1
        return b


def make_task(width=8, nan_at=None):
    model = MLP(width)

    def loss(params, batch, rng):
        noise = 1e-3 * jax.random.normal(rng, batch["y"].shape)  # exercises the step rng
        pred = model.apply({"params": params}, batch["x"])
        mse = jnp.mean((pred - batch["y"] - noise) ** 2)
        return mse, {"mse": mse}

    return loop.Task(init=lambda rng, b: model.init(rng, b["x"]), loss=loss,
                     batches=lambda start, mesh: Batches(start, nan_at=nan_at),
                     example=Batches(0).make(0))


def make_cfg(lr=1e-2, optimizer="adamw", mesh=MeshConfig(data=1, fsdp=1, model=1), **train):
    base = dict(batch_size=8, steps=12, log_every=4, eval_every=0, ckpt_every=4,
                keep_checkpoints=5, ema_decay=0.9)
    base.update(train)
    return config_lib.ExperimentConfig(
        name="toy", model=None, train=config_lib.TrainConfig(**base),
        optim=config_lib.OptimConfig(optimizer=optimizer, learning_rate=lr, warmup_steps=2,
                                     grad_clip=0.0),
        mesh=mesh)


def _leaves(state):
    return jax.tree.leaves(jax.device_get(state))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, optimizer):
    cfg = make_cfg(optimizer=optimizer)
    full = loop.train(cfg, make_task(), tmp_path / "a", progress=False)
    loop.train(cfg, make_task(), tmp_path / "b", stop_after=7, progress=False)
    # "Killed" after step 7: the latest complete checkpoint is step 4.
    assert Checkpointer(tmp_path / "b").latest_step() == 4
    resumed = loop.train(cfg, make_task(), tmp_path / "b", progress=False)
    assert int(resumed.step) == 12
    for a, b in zip(_leaves(full), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line)
            for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12 and np.isfinite(rows[-1]["loss"])


def test_training_reduces_loss(tmp_path):
    cfg = make_cfg(lr=3e-2, steps=100, ckpt_every=0, log_every=10)
    loop.train(cfg, make_task(width=16), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.1 * rows[0]["loss"]


def test_nonfinite_stops_naming_step_and_leaf_and_keeps_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteError,
                       match=r"step 6 \(first non-finite gradient leaf: Dense_0/bias\)"
                             r".*step 4\) is untouched"):
        loop.train(make_cfg(), make_task(nan_at=5), tmp_path, progress=False)
    ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 4
    params = ck.restore_params(4)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_nonfinite_skip_counts_and_continues(tmp_path):
    state = loop.train(make_cfg(on_nonfinite="skip"), make_task(nan_at=5), tmp_path,
                       progress=False)
    assert int(state.step) == 12 and int(state.skipped) == 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


def test_checkpoint_of_other_model_names_path_and_shapes(tmp_path):
    loop.train(make_cfg(steps=4), make_task(width=8), tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError,
                       match=r"params/Dense_0/kernel: checkpoint shape \(4, 8\), config shape "
                             r"\(4, 16\)"):
        loop.train(make_cfg(steps=8), make_task(width=16), tmp_path, progress=False)


def test_batch_not_divisible_by_mesh():
    cfg = dataclasses.replace(make_cfg(batch_size=6), mesh=MeshConfig(data=2, fsdp=2, model=2))
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the mesh's "
                                         r"data×fsdp size 4"):
        loop.train(cfg, make_task(), "/tmp/unused-never-created", progress=False)


def test_weight_decay_mask_skips_norms_biases_embeddings():
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
              "LayerNorm_0": {"scale": jnp.ones(3)}, "Embed_0": {"embedding": jnp.ones((5, 3))},
              "logit_scale": jnp.ones(()),
              "Boxed": {"kernel": nn.LogicallyPartitioned(jnp.ones((2, 2)), ("embed", "mlp"))}}
    mask = optim.decay_mask(params)
    assert mask["Dense_0"] == {"kernel": True, "bias": False}
    assert not mask["LayerNorm_0"]["scale"] and not mask["Embed_0"]["embedding"]
    assert not mask["logit_scale"] and mask["Boxed"]["kernel"].value


def test_muon_trains_sharded_as_on_one_device(tmp_path):
    """Muon's state lives beside boxed, sharded kernels (the partition's empty nodes included):
    the run on a data × fsdp × model mesh of 8 devices ends where the one-device run does."""
    one = loop.train(make_cfg(lr=3e-2, optimizer="muon"), make_task(width=16), tmp_path / "a",
                     progress=False)
    eight = loop.train(make_cfg(lr=3e-2, optimizer="muon", mesh=MeshConfig(data=2, fsdp=2,
                                                                            model=2)),
                       make_task(width=16), tmp_path / "b", progress=False)
    for a, b in zip(_leaves(one.params), _leaves(eight.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_schedule_warmup_then_cosine():
    sched = optim.learning_rate_schedule(config_lib.OptimConfig(learning_rate=1.0,
                                                                warmup_steps=10), 110)
    assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6
    assert abs(float(sched(10)) - 1.0) < 1e-6 and abs(float(sched(60)) - 0.5) < 1e-6
    assert float(sched(110)) < 1e-6
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        optim.learning_rate_schedule(config_lib.OptimConfig(schedule="linear"), 10)


def test_params_saved_on_8_devices_restore_on_one(tmp_path):
    """A run trained data-parallel over several devices (the demo on a 2-core CPU) must load
    where there is one device (a notebook): ``restore_params`` ignores the saved layout."""
    import subprocess
    import sys

    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",))
    w = np.arange(64, dtype=np.float32).reshape(16, 4)
    state = {"params": {"w": jax.device_put(w, NamedSharding(mesh, PartitionSpec("data")))},
             "step": jnp.int32(3)}
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(3, state, {"position": 0}, {"name": "x"})
    ck.close()
    script = ("import jax, numpy as np; from unclip_jax.train.checkpoint import Checkpointer; "
              f"p = Checkpointer({str(tmp_path)!r}, async_save=False).restore_params(); "
              "print(len(jax.devices()), float(np.asarray(p['w']).sum()), p['w'].shape)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env={**env, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", str(float(w.sum())), "(16,", "4)"]
