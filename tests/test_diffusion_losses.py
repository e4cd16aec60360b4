"""Objectives: conversions between ε, x₀ and v, learned variance, hybrid loss, cond dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core.diffusion import (
    drop_condition,
    learned_log_variance,
    make_schedule,
    output_to_x0_eps,
    q_sample,
    sample_timesteps,
    training_loss,
    x0_eps_to_output,
)
from unclip_jax.core.diffusion.losses import min_snr_weight, normal_kl, x0_to_eps

S = make_schedule("cosine", 1000)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_conversions_are_exact_inverses(kind):
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (64, 4, 4, 3))
    eps = jax.random.normal(k2, x0.shape)
    i = jnp.arange(64) * 15 + 5
    xt = q_sample(S, x0, i, eps)
    out = x0_eps_to_output(S, xt, i, x0, eps, kind)
    x0_b, eps_b = output_to_x0_eps(S, xt, i, out, kind)
    tol = dict(atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(x0_b, x0, **tol)
    np.testing.assert_allclose(eps_b, eps, **tol)


def test_v_definition():
    x0, eps = jnp.ones((2, 3)), -jnp.ones((2, 3))
    i = jnp.array([100, 900])
    v = x0_eps_to_output(S, q_sample(S, x0, i, eps), i, x0, eps, "v")
    a, s = np.sqrt(np.asarray(S.alphas_cumprod)[[100, 900]]), None
    s = np.sqrt(1 - np.asarray(S.alphas_cumprod)[[100, 900]])
    np.testing.assert_allclose(v[:, 0], a * -1 - s * 1, rtol=1e-5)


def test_learned_variance_interpolates_in_log_space():
    i = jnp.array([10, 500])
    lo = np.asarray(S.posterior_log_variance_clipped)[[10, 500]]
    hi = np.log(np.asarray(S.betas)[[10, 500]])
    got = learned_log_variance(S, i, jnp.zeros((2, 1)))[:, 0]
    np.testing.assert_allclose(got, 0.5 * (lo + hi), rtol=1e-5)          # geometric mean
    assert not np.allclose(np.exp(got), 0.5 * (np.exp(lo) + np.exp(hi)), rtol=1e-3)
    np.testing.assert_allclose(learned_log_variance(S, i, -jnp.ones((2, 1)))[:, 0], lo, rtol=1e-6)
    np.testing.assert_allclose(learned_log_variance(S, i, jnp.ones((2, 1)))[:, 0], hi, rtol=1e-6)


def test_normal_kl_zero_for_equal():
    m, lv = jnp.array([0.3]), jnp.array([-1.2])
    assert float(normal_kl(m, lv, m, lv)[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(normal_kl(m, lv, m + 1, lv)[0]) > 0


def test_sample_timesteps_uniform():
    t = np.asarray(sample_timesteps(jax.random.key(0), 100000, 10))
    assert t.min() == 0 and t.max() == 9
    np.testing.assert_allclose(np.bincount(t) / 1e5, 0.1, atol=0.01)


def _denoiser(params, x, t, cond):
    return jnp.concatenate([params["m"] * x, params["v"] * jnp.ones_like(x)], -1)


def test_hybrid_loss_stops_gradient_of_vlb_into_the_mean():
    params = {"m": jnp.float32(0.5), "v": jnp.float32(0.1)}
    x0 = jax.random.uniform(jax.random.key(1), (32, 4, 4, 3), minval=-1, maxval=1)

    def metric(p, name):
        return training_loss(p, x0, None, jax.random.key(2), denoiser=_denoiser, schedule=S,
                             learned_variance=True)[1][name]

    g_vlb = jax.grad(lambda p: metric(p, "vlb"))(params)
    assert float(g_vlb["m"]) == 0.0 and float(g_vlb["v"]) != 0.0
    g_mse = jax.grad(lambda p: metric(p, "mse"))(params)
    assert float(g_mse["v"]) == 0.0 and float(g_mse["m"]) != 0.0
    loss, m = training_loss(params, x0, None, jax.random.key(2), denoiser=_denoiser, schedule=S,
                            learned_variance=True)
    assert float(loss) == pytest.approx(float(m["mse"] + 0.001 * 1000 * m["vlb"]), rel=1e-4)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_training_loss_plain(kind):
    params = {"w": jnp.float32(0.0)}
    x0 = jnp.ones((16, 3))
    f = lambda p, x, t, c: p["w"] * x + c["e"][:, None]  # noqa: E731
    loss, metrics = jax.jit(lambda p: training_loss(
        p, x0, {"e": jnp.zeros(16)}, jax.random.key(0), denoiser=f, schedule=S,
        model_output=kind, cond_drop_prob=0.5))(params)
    assert np.isfinite(float(loss)) and set(metrics) == {"mse", "loss"}
    with pytest.raises(ValueError, match=r"expected \(16, 6\)"):
        training_loss(params, x0, None, jax.random.key(0), denoiser=lambda p, x, t, c: x,
                      schedule=S, learned_variance=True)


def test_drop_condition():
    cond = {"emb": jnp.ones((1000, 4)), "txt": jnp.ones((1000, 3, 2))}
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                     drop_condition(jax.random.key(0), cond, 0.0), cond))
    all_null = drop_condition(jax.random.key(0), cond, 1.0)
    assert float(all_null["emb"].sum()) == 0 and float(all_null["txt"].sum()) == 0
    # a learned null (broadcast), one draw per example shared by the leaves
    null = {"emb": jnp.full((4,), 7.0), "txt": jnp.full((3, 2), -1.0)}
    d = drop_condition(jax.random.key(1), cond, 0.3, null)
    dropped = np.asarray(d["emb"][:, 0] == 7.0)
    assert 0.25 < dropped.mean() < 0.35
    np.testing.assert_array_equal(dropped, np.asarray(d["txt"][:, 0, 0] == -1.0))
    # independent per-key probabilities (unCLIP decoder: CLIP emb 10%, caption 50%)
    d = drop_condition(jax.random.key(2), cond, {"emb": 0.1, "txt": 0.5})
    assert 0.07 < float((d["emb"][:, 0] == 0).mean()) < 0.13
    assert 0.45 < float((d["txt"][:, 0, 0] == 0).mean()) < 0.55
    with pytest.raises(ValueError, match="cond lacks"):
        drop_condition(jax.random.key(2), cond, {"image": 0.1})


def test_joint_drop_trains_the_unconditional_input_on_q_plus_the_product():
    """With ``joint_prob`` q both keys are null together for q + (1 − q)·p₁·p₂ of the examples
    (unCLIP's independent drops alone: p₁·p₂), each key alone for q + (1 − q)·pᵢ."""
    n = 200_000
    cond = {"emb": jnp.ones((n, 1)), "txt": jnp.ones((n, 1))}
    probs, q = {"emb": 0.1, "txt": 0.2}, 0.1
    for joint, want_both in ((0.0, 0.02), (q, q + (1 - q) * 0.02)):
        d = drop_condition(jax.random.key(3), cond, probs, joint_prob=joint)
        emb0, txt0 = np.asarray(d["emb"][:, 0] == 0), np.asarray(d["txt"][:, 0] == 0)
        se = (want_both * (1 - want_both) / n) ** 0.5
        assert abs((emb0 & txt0).mean() - want_both) < 4 * se
        for got, p in ((emb0.mean(), 0.1), (txt0.mean(), 0.2)):
            want = joint + (1 - joint) * p
            assert abs(got - want) < 4 * (want * (1 - want) / n) ** 0.5
    # the same key gives the same independent draws: the joint drop only adds nulls
    base = drop_condition(jax.random.key(3), cond, probs)
    joint = drop_condition(jax.random.key(3), cond, probs, joint_prob=q)
    assert bool(jnp.all((base["emb"] == 0) <= (joint["emb"] == 0)))
    with pytest.raises(ValueError, match="joint_prob needs drop_prob given per key"):
        drop_condition(jax.random.key(3), cond, 0.1, joint_prob=q)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error(kind):
    """Whatever the output kind, weight × output-MSE = min(SNR, γ) × x₀-MSE (Hang et al. 2023)."""
    i = jnp.array([0, 50, 300, 600, 900, 999])
    k0, k1, k2 = jax.random.split(jax.random.key(3), 3)
    x0 = jax.random.uniform(k0, (6, 8), minval=-1, maxval=1)
    eps = jax.random.normal(k1, (6, 8))
    x_t = q_sample(S, x0, i, eps)
    x0_hat = x0 + 0.1 * jax.random.normal(k2, (6, 8))
    eps_hat = x0_to_eps(S, x_t, i, x0_hat)
    out_err = jnp.mean((x0_eps_to_output(S, x_t, i, x0_hat, eps_hat, kind)
                        - x0_eps_to_output(S, x_t, i, x0, eps, kind)) ** 2, axis=1)
    ac = np.asarray(S.alphas_cumprod, np.float64)[np.asarray(i)]
    snr = ac / (1 - ac)
    want = np.minimum(snr, 5.0) * np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2, axis=1)
    got = np.asarray(min_snr_weight(S, i, kind, 5.0) * out_err)
    np.testing.assert_allclose(got, want, rtol=2e-3)


def test_min_snr_in_the_training_loss():
    params = {"w": jnp.float32(0.3)}
    x0 = jax.random.uniform(jax.random.key(0), (64, 4, 4, 3), minval=-1, maxval=1)
    f = lambda p, x, t, c: p["w"] * x  # noqa: E731

    def loss(kind, gamma):
        return float(training_loss(params, x0, None, jax.random.key(1), denoiser=f, schedule=S,
                                   model_output=kind, min_snr_gamma=gamma)[0])

    # for ε the weight is min(SNR, γ)/SNR: 1 everywhere when γ is above every SNR
    assert loss("eps", 1e30) == pytest.approx(loss("eps", 0.0), rel=1e-6)
    assert loss("v", 5.0) < loss("v", 0.0)      # v weights are min(SNR, γ)/(SNR+1) < 1
    with pytest.raises(ValueError, match="min_snr_gamma must be ≥ 0"):
        loss("v", -1.0)


def test_auxiliary_loss_of_the_denoiser_is_added_per_example():
    """A denoiser returning ``(output, aux)`` adds ``aux`` to each example's loss (the mean
    grows by mean(aux), the diffusion terms are unchanged); an ``aux`` not of shape [B] fails."""
    params = {"w": jnp.float32(0.3)}
    x0 = jax.random.uniform(jax.random.key(0), (8, 4, 4, 3), minval=-1, maxval=1)
    aux = jnp.arange(8, dtype=jnp.float32) / 10
    plain = lambda p, x, t, c: p["w"] * x  # noqa: E731

    def run(f):
        return training_loss(params, x0, None, jax.random.key(1), denoiser=f, schedule=S,
                             model_output="v", min_snr_gamma=5.0)

    loss0, m0 = run(plain)
    loss1, m1 = run(lambda p, x, t, c: (plain(p, x, t, c), aux))
    assert float(m1["mse"]) == float(m0["mse"]) and "aux" not in m0
    assert float(m1["aux"]) == pytest.approx(0.35)
    assert float(loss1) == pytest.approx(float(loss0) + 0.35, rel=1e-6)
    with pytest.raises(ValueError, match=r"auxiliary loss has shape \(8, 1\); expected "
                                         r"\(8,\), one value per example"):
        run(lambda p, x, t, c: (plain(p, x, t, c), aux[:, None]))


def test_self_conditioning_feeds_the_stop_gradient_estimate_on_a_share_of_batches():
    """An x₀ denoiser ``a + b·self_cond``: a first pass given zeros estimates x̂₀ = a, the
    trained pass predicts a + b·x̂₀. Its gradient in ``a`` is the closed form with x̂₀ held fixed
    (stop-gradient: 2(a + b a − x₀), not (1 + b) times that); a batch that draws no estimate
    trains a alone; the estimate is drawn for a share p of the batches."""
    x0 = jax.random.uniform(jax.random.key(0), (8, 4, 4, 3), minval=-1, maxval=1)
    b = 0.5

    def f(p, x, t, c):
        return p["a"] + b * c["self_cond"]

    def run(a, prob, key=1):
        return training_loss({"a": a}, x0, {}, jax.random.key(key), denoiser=f, schedule=S,
                             model_output="x0", self_condition=prob)[0]

    a = jnp.float32(0.2)
    used = float(run(a, 0.999999))
    assert used == pytest.approx(float(jnp.mean((a + b * a - x0) ** 2)), rel=1e-6)
    assert float(jax.grad(run)(a, 0.999999)) == pytest.approx(
        float(jnp.mean(2 * (a + b * a - x0))), rel=1e-5)
    assert float(run(a, 1e-6)) == pytest.approx(float(jnp.mean((a - x0) ** 2)), rel=1e-6)
    # the share of batches that draw the estimate: 0.3 over 400 batches (±4 s.e. ≈ 0.09)
    drawn = jax.vmap(lambda k: run(a, 0.3, k))(jnp.arange(400))
    share = float(jnp.mean(jnp.isclose(drawn, used, rtol=1e-6)))
    assert abs(share - 0.3) < 0.09


@pytest.mark.parametrize("p", [1.0, -0.1])
def test_self_condition_outside_its_range_is_refused(p):
    with pytest.raises(ValueError, match=rf"self_condition {p} is not a self-conditioning "
                                         rf"probability; accepted: 0 \(off\) or 0 < p < 1"):
        training_loss({}, jnp.zeros((2, 3)), {}, jax.random.key(0),
                      denoiser=lambda p, x, t, c: x, schedule=S, self_condition=p)
    with pytest.raises(ValueError, match=r"cond must be a dict"):
        training_loss({}, jnp.zeros((2, 3)), None, jax.random.key(0),
                      denoiser=lambda p, x, t, c: x, schedule=S, self_condition=0.5)
