"""``optim.optimizer="muon"``: which leaves Muon updates, its update against a NumPy
Newton–Schulz reference, AdamW's leaves unchanged, the refused values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.core.config import OptimConfig
from unclip_jax.train import optim

NS_COEFFS = (3.4445, -4.7750, 2.0315)      # Jordan et al. 2024's quintic


def newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """The reference: ``g`` normalised by its Frobenius norm, then ``steps`` quintic
    iterations X ← aX + (bA + cA²)X with A = XXᵀ, on the wide orientation."""
    x = g.astype(np.float64) / (np.linalg.norm(g) + 1e-8)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    a, b, c = NS_COEFFS
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


def params_and_grads():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    params = {"conv_in": {"kernel": normal(3, 3, 4, 8)},
              "block": {"conv": {"kernel": nn.LogicallyPartitioned(
                            normal(3, 3, 4, 8), (None, None, "embed", "mlp")),
                                 "bias": normal(8)},
                        "dense": {"kernel": normal(16, 8)},
                        "attn": {"kernel": normal(8, 2, 4)},
                        "norm": {"scale": normal(8)}},
              "embed": {"embedding": normal(10, 8)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    return params, grads


def config(**kw):
    base = dict(optimizer="muon", learning_rate=0.5, warmup_steps=0, schedule="constant",
                weight_decay=0.0, grad_clip=0.0, muon_adamw_modules=("conv_in",))
    return OptimConfig(**{**base, **kw})


def test_labels_muon_for_dense_and_conv_kernels_only():
    params, _ = params_and_grads()
    labels = optim.muon_labels(params, ("conv_in",))
    assert labels["block"]["conv"]["kernel"].value == "muon"
    assert labels["block"]["dense"]["kernel"] == "muon"
    assert labels["conv_in"]["kernel"] == "adamw"          # named module: AdamW
    assert labels["block"]["attn"]["kernel"] == "adamw"    # rank 3: input axes not known
    for leaf in (labels["block"]["conv"]["bias"], labels["block"]["norm"]["scale"],
                 labels["embed"]["embedding"]):
        assert leaf == "adamw"


def test_first_update_is_the_scaled_newton_schulz_of_the_gradient():
    """Step 1: Nesterov momentum is a multiple of the gradient, and the Frobenius
    normalisation removes the multiple, so the update is −lr · 0.2 · √max(fan_in, fan_out) ·
    NS(g), the conv kernel read as its [kh·kw·in, out] matrix."""
    params, grads = params_and_grads()
    cfg = config()
    tx = optim.make_optimizer(cfg, 10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for kernel, update in ((grads["block"]["dense"]["kernel"],
                            updates["block"]["dense"]["kernel"]),
                           (grads["block"]["conv"]["kernel"].value,
                            updates["block"]["conv"]["kernel"].value)):
        g = np.asarray(kernel).reshape(-1, kernel.shape[-1])
        want = -cfg.learning_rate * 0.2 * max(g.shape) ** 0.5 * newton_schulz(g)
        np.testing.assert_allclose(np.asarray(update).reshape(g.shape), want, rtol=2e-4,
                                   atol=2e-5)
        # nearly orthogonal: the quintic leaves singular values in about [0.7, 1.2]
        s = np.linalg.svd(want / (cfg.learning_rate * 0.2 * max(g.shape) ** 0.5),
                          compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.25


@pytest.mark.parametrize("shape", [(36, 8), (8, 36), (12, 10), (128, 64)])
def test_newton_schulz_on_the_gram_matrix_equals_the_direct_iteration(shape):
    """Wide and tall matrices (the r × r form) and near-square ones (the direct form)."""
    g = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(optim.newton_schulz(jnp.asarray(g))),
                               newton_schulz(g), rtol=1e-4, atol=2e-5)


def test_several_steps_match_optax_muon():
    """The momentum (Nesterov, bias-corrected) and the orthogonalisation against optax's
    ``contrib.scale_by_muon`` on the same gradients, with the shape scaling applied to it."""
    rng = np.random.default_rng(2)
    params = {"conv": jnp.zeros((3, 3, 4, 8)), "dense": jnp.zeros((16, 8))}
    ours = optim.scale_by_muon(0.95)
    dims = lambda u: optax.contrib.MuonDimensionNumbers(  # noqa: E731
        tuple(range(u.ndim - 1)), u.ndim - 1)
    ref = optax.contrib.scale_by_muon(beta=0.95, nesterov=True,
                                      weight_dimension_numbers=lambda t: jax.tree.map(dims, t))
    s1, s2 = ours.init(params), ref.init(params)
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                             params)
        u1, s1 = jax.jit(ours.update)(grads, s1)
        u2, s2 = jax.jit(ref.update)(grads, s2)
        for name, p in params.items():
            scale = 0.2 * max(p.size // p.shape[-1], p.shape[-1]) ** 0.5
            np.testing.assert_allclose(np.asarray(u1[name]), scale * np.asarray(u2[name]),
                                       rtol=2e-4, atol=2e-5)


def test_other_leaves_get_exactly_adamws_update():
    params, grads = params_and_grads()
    cfg = config(weight_decay=0.1)
    tx, ref = optim.make_optimizer(cfg, 10), optim.make_optimizer(config(optimizer="adamw",
                                                                         weight_decay=0.1), 10)
    state, ref_state = tx.init(params), ref.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        want, ref_state = ref.update(grads, ref_state, params)
    labels = optim.muon_labels(params, cfg.muon_adamw_modules)
    flat = lambda tree: jax.tree.leaves(tree)  # noqa: E731
    compared = 0
    for label, u, w in zip(flat(labels), flat(updates), flat(want), strict=True):
        if label == "adamw":
            np.testing.assert_array_equal(np.asarray(u), np.asarray(w))
            compared += 1
    assert compared == 5


def test_refused_values_name_the_accepted_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; accepted: adamw, muon"):
        optim.make_optimizer(config(optimizer="lion"), 10)
    with pytest.raises(ValueError, match=r"optim.muon_momentum must be in \[0, 1\), got 1.0"):
        optim.make_optimizer(config(muon_momentum=1.0), 10)
    params, _ = params_and_grads()
    with pytest.raises(ValueError, match="optim.muon_adamw_modules names 'conv_inn', which no "
                                         "parameter path contains"):
        optim.make_optimizer(config(muon_adamw_modules=("conv_inn",)), 10).init(params)


def test_adamw_state_layout_is_unchanged():
    """Checkpoints of AdamW runs keep their optimizer-state tree: (clip, adamw) or (adamw,)."""
    params, _ = params_and_grads()
    for clip in (0.0, 1.0):
        state = optim.make_optimizer(config(optimizer="adamw", grad_clip=clip), 10).init(params)
        want = optax.chain(*([optax.clip_by_global_norm(clip)] if clip else []),
                           optax.adamw(lambda step: 1.0, mask=optim.decay_mask)).init(params)
        assert jax.tree.structure(state) == jax.tree.structure(want)
