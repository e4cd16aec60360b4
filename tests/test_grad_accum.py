"""Gradient accumulation inside one jitted step: 4 micro-batches == the full batch.

The comparison needs a loss that is a mean of per-example terms whose random draws do not
depend on how the batch is cut: the AR prior's cross-entropy without caption dropout, and the
diffusion prior's x₀-MSE with the timesteps and noise carried in the batch (the real
``diffusion.training_loss`` draws them per batch from the key, so an accumulated step is a
different — equally valid — sample of the objective; see ``loop.accumulated_value_and_grad``).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core import config as config_lib
from unclip_jax.core import sharding
from unclip_jax.core.diffusion.schedule import q_sample
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models import prior, prior_ar
from unclip_jax.train import loop
from unclip_jax.train.optim import make_optimizer
from unclip_jax.train.state import TrainState

B, K = 16, 4
# Adam's eps at 1e-3: the first Adam step is ≈ lr·sign(g), which would turn float noise on a
# gradient that is exactly zero (e.g. the bias of a code that is exactly as frequent as the
# uniform initial prediction) into a full-size update; eps ≫ noise keeps those updates tiny.
OPTIM = config_lib.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant",
                               eps=1e-3)

AR_CFG = prior_ar.ARPriorConfig(embed_dim=8, text_length=5, text_width=12, pca_dims=6,
                                num_buckets=16, sim_buckets=4, width=32, depth=1, num_heads=4,
                                caption_dropout=0.0)
PRIOR_CFG = prior.PriorConfig(embed_dim=8, text_width=12, context_length=5, width=32, depth=1,
                              num_heads=4, num_timesteps=100, cond_drop_prob=0.0)


def ar_batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, AR_CFG.num_buckets, (n, AR_CFG.pca_dims + 1))
    tokens[:, 0] = AR_CFG.num_buckets + rng.integers(0, AR_CFG.sim_buckets, n)
    text_tokens = rng.integers(1, 30, (n, AR_CFG.text_length))
    text_tokens[:, 3:] *= rng.integers(0, 2, (n, 1))       # some captions padded after 3
    return {"tokens": tokens.astype(np.int32),
            "text_states": rng.normal(size=(n, AR_CFG.text_length, AR_CFG.text_width)
                                      ).astype(np.float32),
            "text_tokens": text_tokens.astype(np.int32),
            "text_emb": rng.normal(size=(n, AR_CFG.embed_dim)).astype(np.float32)}


def prior_batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, PRIOR_CFG.embed_dim))
    text_emb = rng.normal(size=(n, PRIOR_CFG.embed_dim))
    tokens = rng.integers(1, 30, (n, PRIOR_CFG.context_length))
    tokens[:, 3:] *= rng.integers(0, 2, (n, 1))
    return {"image_emb": (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32),
            "text_emb": (text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
                         ).astype(np.float32),
            "text_states": rng.normal(size=(n, PRIOR_CFG.context_length, PRIOR_CFG.text_width)
                                      ).astype(np.float32),
            "text_tokens": tokens.astype(np.int32),
            "t": rng.integers(0, PRIOR_CFG.num_timesteps, n).astype(np.int32),
            "noise": rng.normal(size=(n, PRIOR_CFG.embed_dim)).astype(np.float32)}


def ar_task():
    model = prior_ar.ARPrior(AR_CFG)
    # rng=None: the real loss without caption dropout (a mean of per-example terms).
    return (lambda rng, b: model.init(rng, b["tokens"], prior_ar.cond_inputs(b)),
            lambda p, b, rng: prior_ar.loss_fn(model, p, b, None))


def prior_task():
    model = prior.DiffusionPrior(PRIOR_CFG)
    schedule = prior.base_schedule(PRIOR_CFG)

    def loss(params, batch, rng):
        x0 = prior.to_model_space(PRIOR_CFG, batch["image_emb"])
        x_t = q_sample(schedule, x0, batch["t"], batch["noise"])
        out = model.apply({"params": params}, x_t, batch["t"], prior.condition(PRIOR_CFG, batch))
        mse = jnp.mean((out - x0) ** 2)
        return mse, {"mse": mse, "count": jnp.asarray(x0.shape[0], jnp.int32)}

    init = lambda rng, b: model.init(rng, b["image_emb"], b["t"],  # noqa: E731
                                     prior.condition(PRIOR_CFG, b))
    return init, loss


def one_step(init, loss, batch, k):
    tx = make_optimizer(OPTIM, 10)
    params = nn.meta.unbox(init(jax.random.key(0), batch))["params"]
    state = TrainState.create(params, tx, jax.random.key(1), ema=False)
    step = jax.jit(functools.partial(loop.train_step, loss_fn=loss, tx=tx, ema_decay=0.0,
                                     grad_accum_steps=k))
    return jax.device_get(step(state, batch))


def assert_tree_close(a, b, rtol=1e-5, floor=0.1):
    """Leafwise ``|b − a| ≤ rtol · max(max|a|, floor)`` (floor: a typical weight scale)."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                            strict=True):
        scale = max(float(np.max(np.abs(x))), floor)
        np.testing.assert_allclose(y, x, rtol=0, atol=rtol * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("which", ["prior_ar", "prior"])
def test_four_micro_batches_equal_the_full_batch(which):
    init, loss = ar_task() if which == "prior_ar" else prior_task()
    batch = ar_batch() if which == "prior_ar" else prior_batch()
    full, m_full = one_step(init, loss, batch, 1)
    acc, m_acc = one_step(init, loss, batch, K)
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    assert m_acc["loss"].dtype == np.float32
    assert_tree_close(full.params, acc.params)
    assert_tree_close(full.opt_state, acc.opt_state, floor=1e-4)
    # The step really moved the params (a no-op update would pass the comparison too).
    p0 = nn.meta.unbox(init(jax.random.key(0), batch))["params"]
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(jax.device_get(p0)), jax.tree.leaves(full.params)))
    assert moved > 1e-3
    if which == "prior":        # metrics are averaged over micro-batches
        assert m_acc["count"] == pytest.approx(B / K)


def test_micro_batches_are_strided_and_see_all_rows():
    x = np.arange(12 * 2).reshape(12, 2)
    micro = np.asarray(loop.micro_batches({"x": jnp.asarray(x)}, 3)["x"])
    assert micro.shape == (3, 4, 2)
    np.testing.assert_array_equal(micro[1, :, 0], x[1::3, 0])
    np.testing.assert_array_equal(np.sort(micro.reshape(-1, 2), 0), x)


def test_split_moves_no_data_between_devices():
    """Each device already holds its share of every micro-batch: the compiled split is a local
    reshape (no collective), whereas a contiguous split would need one."""
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, model=2))
    rules = sharding.logical_rules("fsdp_tp")
    x = jax.device_put(jnp.arange(32 * 3, dtype=jnp.float32).reshape(32, 3),
                       sharding.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        strided = jax.jit(lambda b: loop.micro_batches(b, 4))
        hlo = strided.lower({"x": x}).compile().as_text()
        out = strided({"x": x})["x"]
        contiguous = jax.jit(lambda b: nn.with_logical_constraint(
            b.reshape(4, 8, 3), (None, "batch", None)))
        hlo_contiguous = contiguous.lower(x).compile().as_text()
    collectives = ("all-to-all", "all-gather", "collective-permute", "all-reduce")
    assert not any(c in hlo for c in collectives), hlo
    assert any(c in hlo_contiguous for c in collectives)   # the check can fail
    assert out.sharding.spec[1] == sharding.BATCH_AXES
    shard = out.addressable_shards[0]
    assert shard.data.shape == (4, 2, 3)


def test_accumulated_sharded_run_equals_single_device_full_batch(tmp_path):
    """Through ``loop.train``: data=2, fsdp=2, model=2 with 4 micro-batches per step == one
    device with the whole batch, two steps."""
    init, loss = ar_task()

    class Stream:
        def __init__(self, start):
            self.position = start

        def __next__(self):
            self.position += 1
            return ar_batch(self.position - 1)

    def run(path, mesh, k):
        cfg = config_lib.ExperimentConfig(
            name="accum", model=AR_CFG, mesh=mesh, optim=OPTIM,
            train=config_lib.TrainConfig(batch_size=B, steps=2, log_every=1, ckpt_every=0,
                                         grad_accum_steps=k, async_checkpoint=False))
        task = loop.Task(init=init, loss=loss, batches=lambda s, m: Stream(s),
                         example=ar_batch())
        return jax.device_get(loop.train(cfg, task, path, progress=False).params)

    single = run(tmp_path / "single", MeshConfig(data=1, fsdp=1, model=1), 1)
    sharded = run(tmp_path / "sharded", MeshConfig(data=2, fsdp=2, model=2), K)
    assert_tree_close(single, sharded)


def test_indivisible_batch_is_an_error(tmp_path):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, model=2))
    with pytest.raises(ValueError, match=r"not divisible by train.grad_accum_steps × the "
                                         r"mesh's data×fsdp size = 3 × 4 = 12"):
        loop.check_accumulation(16, 3, mesh)
    with pytest.raises(ValueError, match="grad_accum_steps must be ≥ 1, got 0"):
        loop.check_accumulation(16, 0, mesh)
    loop.check_accumulation(16, 4, mesh)   # 16 = 4 micro-batches × 4 devices
    with pytest.raises(ValueError, match="must be a multiple of 8|multiple of 8"):
        loop.check_accumulation(12, 2, mesh)
    init, loss = ar_task()
    with pytest.raises(ValueError, match="does not split into grad_accum_steps=3"):
        one_step(init, loss, ar_batch(n=8), 3)
    # Through the loop: the config's error, before anything is compiled.
    cfg = config_lib.ExperimentConfig(
        name="bad", model=AR_CFG, mesh=MeshConfig(data=2, fsdp=2, model=2),
        train=config_lib.TrainConfig(batch_size=B, steps=1, grad_accum_steps=8))
    task = loop.Task(init=init, loss=loss, batches=None, example=ar_batch())
    with pytest.raises(ValueError, match="8 × 4 = 32"):
        loop.train(cfg, task, tmp_path, progress=False)
