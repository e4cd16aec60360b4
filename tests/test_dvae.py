"""dVAE: logit-Laplace, ε map, gumbel relaxation, KL, schedules, shapes, argmax encode, training."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.models import dvae

TINY = dvae.DVAEConfig(image_size=16, num_groups=2, blocks_per_group=1, encoder_width=8,
                       decoder_width=8, decoder_init_width=8, vocab_size=16,
                       tau_steps=100, beta_steps=10, beta_max=0.5)
LOG_PROB = jax.jit(dvae.logit_laplace_log_prob)


@pytest.fixture(scope="module")
def tiny():
    model = dvae.DVAE(TINY)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"])
    return model, params, images


@pytest.mark.parametrize("mu,b", [(0.0, 1.0), (-1.5, 0.5), (2.0, 0.2), (0.7, 0.8)])
def test_logit_laplace_integrates_to_one(mu, b):
    n = 1_000_000
    x = (np.arange(n) + 0.5) / n                       # midpoint rule on (0, 1)
    logp = LOG_PROB(x, mu, math.log(b))
    total = float(np.sum(np.exp(np.asarray(logp, np.float64))) / n)
    assert abs(total - 1.0) < 2e-3, total


def test_logit_laplace_mode_is_sigmoid_mu():
    x = np.linspace(0.01, 0.99, 9801)
    logp = np.asarray(LOG_PROB(x, 1.0, math.log(0.1)))
    assert abs(x[np.argmax(logp)] - jax.nn.sigmoid(1.0)) < 1e-3


def test_eps_map_round_trips_and_bounds():
    x = jnp.linspace(0.0, 1.0, 101)
    y = dvae.map_pixels(x, 0.1)
    np.testing.assert_allclose([y.min(), y.max()], [0.1, 0.9], atol=1e-6)
    np.testing.assert_allclose(dvae.unmap_pixels(y, 0.1), x, atol=1e-6)
    np.testing.assert_allclose(dvae.unmap_pixels(jnp.array([0.0, 1.0]), 0.1), [0.0, 1.0])


def test_gumbel_softmax_approaches_argmax_of_noised_logits():
    key = jax.random.PRNGKey(3)
    logits = jax.random.normal(jax.random.PRNGKey(4), (64, 10))
    g = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32))
    target = np.eye(10)[np.argmax(np.asarray(logits) + g, -1)]
    assert not np.array_equal(np.argmax(target, -1), np.argmax(logits, -1))  # noise matters
    relax = jax.jit(dvae.gumbel_softmax)
    hot = relax(logits, key, 1e-4)
    np.testing.assert_allclose(hot, target, atol=1e-3)
    warm = relax(logits, key, 1.0)
    np.testing.assert_allclose(warm.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.max(warm)) < 0.999


def test_kl_to_uniform_closed_form():
    from scipy.stats import entropy

    logits = np.random.default_rng(1).normal(size=(5, 7)) * 3
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expect = math.log(7) - entropy(q, axis=-1)
    kl = jax.jit(dvae.kl_to_uniform)
    np.testing.assert_allclose(kl(jnp.asarray(logits)), expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kl(jnp.full((3, 7), 2.5)), 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "exponential"])
def test_tau_schedule_endpoints(kind):
    cfg = dvae.DVAEConfig(tau_steps=1000, tau_schedule=kind)
    taus = [float(dvae.tau_at(s, cfg)) for s in (0, 250, 500, 1000, 5000)]
    assert taus[0] == pytest.approx(1.0) and taus[3] == pytest.approx(1 / 16)
    assert taus[4] == pytest.approx(1 / 16)
    assert all(a > b for a, b in zip(taus[:4], taus[1:4]))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_beta_schedule_endpoints(kind):
    cfg = dvae.DVAEConfig(beta_steps=500, beta_schedule=kind)
    betas = [float(dvae.beta_at(s, cfg)) for s in (0, 100, 250, 500, 9999)]
    assert betas[0] == 0.0 and betas[3] == pytest.approx(6.6) and betas[4] == pytest.approx(6.6)
    assert all(a < b for a, b in zip(betas[:4], betas[1:4]))


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="accepted"):
        dvae.tau_at(0, dvae.DVAEConfig(tau_schedule="step"))


def test_shapes_ranges_and_argmax_encode(tiny):
    model, params, images = tiny
    @jax.jit
    def run(params, images):
        logits = model.apply({"params": params}, images, method=dvae.DVAE.encode_logits)
        tokens = dvae.encode(model, params, images)
        stats = model.apply({"params": params}, jax.nn.one_hot(tokens, 16),
                            method=dvae.DVAE.decode_stats)
        return logits, tokens, dvae.encode(model, params, images), \
            dvae.decode(model, params, tokens), stats

    logits, tokens, again, out, stats = run(params, images)
    assert logits.shape == (2, 8, 8, 16) and logits.dtype == jnp.float32
    assert tokens.shape == (2, 8, 8) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(tokens, again)                    # deterministic, no rng
    assert out.shape == (2, 16, 16, 3)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    # decode is sigmoid(μ) through the inverse ε map, from the one-hot codes
    assert stats.shape == (2, 16, 16, 6)
    expect = np.clip((jax.nn.sigmoid(stats[..., :3]) - 0.1) / 0.8, 0, 1) * 2 - 1
    np.testing.assert_allclose(out, expect, atol=1e-6)


def test_post_gain_and_logical_names(tiny):
    _, params, _ = tiny
    boxed = jax.eval_shape(dvae.DVAE(TINY).init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 16, 16, 3)))["params"]
    names = boxed["encoder"]["output"]["kernel"].names
    assert names == (None, None, "conv_in", "vocab")
    assert boxed["decoder"]["input"]["kernel"].names == (None, None, "vocab", "conv_out")
    # the released block: out = x + post_gain · res(x) (same width: identity path)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 4, 8))
    v = jax.jit(dvae.ResBlock(8, (3, 3, 3, 1), post_gain=1.0).init)(jax.random.PRNGKey(2), x)
    res = jax.jit(dvae.ResBlock(8, (3, 3, 3, 1), post_gain=1.0).apply)(v, x) - x
    assert float(jnp.abs(res).max()) > 1e-3
    out = jax.jit(dvae.ResBlock(8, (3, 3, 3, 1), post_gain=1 / 9).apply)(v, x)
    np.testing.assert_allclose(out, x + res / 9, atol=1e-5)


def test_grid_that_does_not_divide_the_image_is_an_error(tiny):
    model, params, _ = tiny
    with pytest.raises(ValueError, match="not divisible by the dVAE's downsampling factor 2"):
        model.apply({"params": params}, jnp.zeros((1, 17, 17, 3)),
                    method=dvae.DVAE.encode_logits)
    with pytest.raises(ValueError, match="multiple of 8"):
        dvae.grid_size(36, 4)
    assert dvae.grid_size(256, 4) == 32 and dvae.PRESETS["dalle"].grid_size == 32


def test_step_batches_carry_the_update_index():
    class Stream:
        position = 5

        def __next__(self):
            self.position += 1
            return {"image": np.zeros((3, 16, 16, 3), np.float32), "mask": np.ones(3, bool)}

    from unclip_jax.data.input_pipeline import MappedBatches

    it = MappedBatches(Stream(), dvae.with_step)
    first, second = next(it), next(it)
    assert set(first) == {"image", "step"}
    np.testing.assert_array_equal(first["step"], [5, 5, 5])
    np.testing.assert_array_equal(second["step"], [6, 6, 6])
    assert it.position == 7


def test_short_training_reduces_the_loss(tiny):
    model, params, _ = tiny
    rng = np.random.default_rng(0)
    # four images of flat colour blocks
    images = np.zeros((4, 16, 16, 3), np.float32)
    for i in range(4):
        images[i, : 8 * (i % 2 + 1)] = rng.uniform(-1, 1, 3)
        images[i, 8 * (i % 2 + 1):] = rng.uniform(-1, 1, 3)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, o, s, key):
        batch = {"image": jnp.asarray(images), "step": jnp.full((4,), s, jnp.int32)}
        (loss, m), g = jax.value_and_grad(
            lambda q: dvae.loss_fn(model, q, batch, key), has_aux=True)(p)
        u, o = tx.update(g, o)
        return optax.apply_updates(p, u), o, loss, m

    opt = tx.init(params)
    losses = []
    for s in range(40):
        params, opt, loss, m = step(params, opt, s, jax.random.PRNGKey(s))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, (losses[:5], losses[-5:])
    assert float(m["beta"]) == pytest.approx(0.5) and float(m["tau"]) < 1.0


# ----------------------------------------------------------------------------- small-data options


def test_gaussian_likelihood_is_a_normal_density_around_sigmoid_mu():
    x = np.linspace(-3, 4, 700_001)
    logp = np.asarray(jax.jit(dvae.gaussian_log_prob, static_argnums=2)(x, 0.3, 0.2), np.float64)
    assert abs(np.sum(np.exp(logp)) * (x[1] - x[0]) - 1.0) < 1e-4
    assert abs(x[np.argmax(logp)] - float(jax.nn.sigmoid(0.3))) < 1e-4
    # closed form at one point
    m = float(jax.nn.sigmoid(0.3))
    assert float(dvae.gaussian_log_prob(0.9, 0.3, 0.2)) == pytest.approx(
        -0.5 * ((0.9 - m) / 0.2) ** 2 - math.log(0.2) - 0.5 * math.log(2 * math.pi), abs=1e-5)


def test_pixel_log_prob_picks_the_likelihood_and_rejects_bad_ones():
    x = jnp.full((2, 3), 0.4)
    stats = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6)), jnp.float32)
    lap = dvae.pixel_log_prob(x, stats, dvae.DVAEConfig())
    np.testing.assert_allclose(lap, dvae.logit_laplace_log_prob(x, stats[:, :3], stats[:, 3:]))
    gau = dvae.pixel_log_prob(x, stats, dvae.DVAEConfig(likelihood="gaussian",
                                                        gaussian_sigma=0.3))
    np.testing.assert_allclose(gau, dvae.gaussian_log_prob(x, stats[:, :3], 0.3))
    with pytest.raises(ValueError, match="unknown likelihood 'l1'; accepted: logit_laplace, "
                                         "gaussian"):
        dvae.pixel_log_prob(x, stats, dvae.DVAEConfig(likelihood="l1"))
    with pytest.raises(ValueError, match="gaussian_sigma must be > 0, got 0.0"):
        dvae.pixel_log_prob(x, stats, dvae.DVAEConfig(likelihood="gaussian", gaussian_sigma=0.0))


def test_usage_kl_rewards_an_evenly_used_codebook_not_uncertain_cells():
    k = 8
    confident = 50.0 * jax.nn.one_hot(jnp.arange(16) % k, k).reshape(2, 2, 4, k)
    # every cell certain, codes used evenly: usage KL 0 although each cell's KL is log K
    assert float(dvae.usage_kl(confident)) == pytest.approx(0.0, abs=1e-5)
    assert float(dvae.kl_to_uniform(confident).mean()) == pytest.approx(math.log(k), abs=1e-4)
    same = 50.0 * jax.nn.one_hot(jnp.zeros(16, jnp.int32), k).reshape(2, 2, 4, k)
    assert float(dvae.usage_kl(same)) == pytest.approx(math.log(k), abs=1e-4)
    two = 50.0 * jax.nn.one_hot(jnp.arange(16) % 2, k).reshape(2, 2, 4, k)
    assert float(dvae.usage_kl(two)) == pytest.approx(math.log(k / 2), abs=1e-4)


def test_logit_scale_and_code_init_std(tiny):
    model, params, images = tiny
    scaled = dvae.DVAE(dataclasses.replace(TINY, logit_scale=3.0))
    run = lambda m: m.apply({"params": params}, images, method=dvae.DVAE.encode_logits)  # noqa
    np.testing.assert_allclose(run(scaled), 3.0 * run(model), rtol=1e-5, atol=1e-6)
    std = lambda cfg: float(np.std(nn.meta.unbox(dvae.DVAE(cfg).init(  # noqa: E731
        jax.random.PRNGKey(0), images)["params"])["decoder"]["input"]["kernel"]))
    assert std(TINY) == pytest.approx(1 / math.sqrt(TINY.vocab_size), rel=0.2)   # fan-in
    assert std(dataclasses.replace(TINY, code_init_std=1.0)) == pytest.approx(1.0, rel=0.2)


def test_usage_weight_adds_exactly_its_term_to_the_loss(tiny):
    model, params, images = tiny
    batch = {"image": images, "step": jnp.full((2,), 7, jnp.int32)}
    key = jax.random.PRNGKey(3)
    base, m = dvae.loss_fn(model, params, batch, key)
    weighted = dvae.DVAE(dataclasses.replace(TINY, usage_weight=0.5))
    loss, m2 = dvae.loss_fn(weighted, params, batch, key)
    cells, dims = 8 * 8, 16 * 16 * 3
    assert float(m2["usage_kl"]) > 0
    assert float(loss - base) == pytest.approx(0.5 * cells * float(m2["usage_kl"]) / dims,
                                               rel=1e-4)


def test_dvae_jit_matches_plain_jit(tiny):
    """dvae.jit (on CPU: YNNPACK conv fusions off) computes what jax.jit computes."""
    model, params, images = tiny
    fwd = lambda p, x: model.apply({"params": p}, x, method=dvae.DVAE.encode_logits)  # noqa
    assert dvae.compiler_options() == dvae._CPU_OPTIONS    # this CPU's XLA knows the option
    np.testing.assert_allclose(dvae.jit(fwd)(params, images), jax.jit(fwd)(params, images),
                               rtol=1e-5, atol=1e-5)
