"""bfloat16 compute: a short training run tracks float32; params, norms, softmax, loss float32.

The compute dtype is each model config's ``dtype`` (the one knob: ``TrainConfig`` has none).
With ``dtype="bfloat16"`` the projections, MLPs and attention matmuls run in bfloat16 while
params, optimizer state, LayerNorm statistics, attention softmax and the loss stay float32.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core import config as config_lib
from unclip_jax.models import prior
from unclip_jax.train import loop
from unclip_jax.train.optim import make_optimizer
from unclip_jax.train.state import TrainState

STEPS, B, N = 30, 16, 64
# Tolerance: the mean loss of the last 10 steps of the bfloat16 run within 3% of the float32
# run's (bfloat16 keeps 8 mantissa bits, ~0.4% relative error per op; the runs' noise draws
# are identical). Measured on this config: 0.0868 vs 0.0868 (0.09% apart), from 1.27 at the
# start — both runs must also have lowered the loss by far more than the margin.
TOLERANCE = 0.03


def prior_cfg(dtype):
    return prior.PriorConfig(embed_dim=8, text_width=16, context_length=6, width=64, depth=2,
                             num_heads=4, num_timesteps=100, cond_drop_prob=0.1, dtype=dtype)


def dataset():
    """Text embeddings that determine the image embeddings (a learnable map) plus noise."""
    r = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa
    text_emb = unit(r.normal(size=(N, 8)))
    image_emb = unit(text_emb @ r.normal(size=(8, 8)) + 0.1 * r.normal(size=(N, 8)))
    tokens = r.integers(1, 30, (N, 6)).astype(np.int32)
    states = (text_emb[:, None, :] @ r.normal(size=(8, 16)) / 3).repeat(6, 1)
    return {"image_emb": image_emb, "text_emb": text_emb,
            "text_states": states.astype(np.float32), "text_tokens": tokens}


def train(dtype):
    cfg = prior_cfg(dtype)
    model = prior.DiffusionPrior(cfg)
    schedule = prior.base_schedule(cfg)
    data = dataset()
    loss = lambda p, b, rng: prior.loss_fn(model, p, b, rng, schedule=schedule)  # noqa: E731
    tx = make_optimizer(config_lib.OptimConfig(learning_rate=2e-3, warmup_steps=5), STEPS)
    first = {k: v[:B] for k, v in data.items()}
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((B, 8)),
                                      jnp.zeros((B,), jnp.int32),
                                      prior.condition(cfg, first)))["params"]
    state = TrainState.create(params, tx, jax.random.key(1), ema=False)
    step = jax.jit(functools.partial(loop.train_step, loss_fn=loss, tx=tx, ema_decay=0.0))
    losses = []
    for i in range(STEPS):
        idx = np.random.default_rng(i).choice(N, B, replace=False)
        state, m = step(state, {k: v[idx] for k, v in data.items()})
        losses.append(float(m["loss"]))
    return state, np.array(losses), model, loss, first


@pytest.fixture(scope="module")
def runs():
    return train("float32"), train("bfloat16")


def test_bfloat16_run_tracks_float32(runs):
    (_, l32, *_), (_, l16, *_) = runs
    assert np.all(np.isfinite(l16)), l16
    end32, end16 = l32[-10:].mean(), l16[-10:].mean()
    assert abs(end16 - end32) <= TOLERANCE * end32, (end32, end16)
    # Both learned (by more than the tolerance), so the comparison is not of two flat lines.
    for losses in (l32, l16):
        assert losses[-10:].mean() < (1 - 2 * TOLERANCE) * losses[:5].mean(), losses


def test_params_and_optimizer_state_stay_float32(runs):
    _, (state, *_) = runs
    leaves = jax.tree.leaves(state.params) + [
        x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the sub-jaxprs (jit, remat, scan, custom_vjp) in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_norms_softmax_and_loss_are_float32_while_matmuls_are_bfloat16(runs):
    _, (state, _, model, loss, batch) = runs
    closed = jax.make_jaxpr(lambda p: loss(p, batch, jax.random.key(0)))(state.params)
    eqns = list(_eqns(closed.jaxpr))
    by = lambda name: [e for e in eqns if e.primitive.name == name]  # noqa: E731
    dots = by("dot_general")
    # The compute really is bfloat16: the transformer's projections take bfloat16 operands.
    assert sum(all(v.aval.dtype == jnp.bfloat16 for v in e.invars) for e in dots) >= 8
    # Softmax (exp) and LayerNorm (rsqrt of the variance) run in float32.
    assert by("exp") and all(e.outvars[0].aval.dtype == jnp.float32 for e in by("exp"))
    assert by("rsqrt") and all(e.outvars[0].aval.dtype == jnp.float32 for e in by("rsqrt"))
    out = closed.out_avals
    assert out[0].dtype == jnp.float32 and out[0].shape == ()
    # And the denoiser's output (x̂₀, compared with the target in the loss) is float32.
    cond = prior.condition(model.config, batch)
    pred = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((B, 8)),
                                                jnp.zeros((B,), jnp.int32), cond), state.params)
    assert pred.dtype == jnp.float32
