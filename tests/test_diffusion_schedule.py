"""Schedules: betas, ᾱ, posterior arrays, q_sample and respacing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core.diffusion import make_schedule, q_posterior, q_sample, respace, space_timesteps
from unclip_jax.core.diffusion.schedule import base_betas


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_arrays(kind):
    s = make_schedule(kind, 1000)
    b = np.asarray(s.betas, np.float64)
    ac = np.asarray(s.alphas_cumprod, np.float64)
    assert s.num_steps == 1000 and s.timesteps.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(s.timesteps), np.arange(1000))
    assert np.all(b > 0) and np.all(b <= np.float32(0.999))
    assert np.all(np.diff(ac) < 0)
    np.testing.assert_allclose(ac, np.cumprod(1 - b), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev)[1:], ac[:-1], rtol=1e-6)
    assert float(s.alphas_cumprod_prev[0]) == 1.0
    pv = np.asarray(s.posterior_variance, np.float64)
    b64 = base_betas(kind, 1000)
    ac64 = np.cumprod(1 - b64)
    np.testing.assert_allclose(pv[1:], b64[1:] * (1 - ac64[:-1]) / (1 - ac64[1:]), rtol=1e-6)
    assert pv[0] == 0.0
    lv = np.asarray(s.posterior_log_variance_clipped)
    assert lv[0] == lv[1] and np.all(np.isfinite(lv))
    np.testing.assert_allclose(lv[1:], np.log(pv[1:]), rtol=1e-5)


def test_linear_endpoints_scale_with_T_and_cosine_cap():
    b = base_betas("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b4 = base_betas("linear", 4000)
    assert b4[0] == pytest.approx(2.5e-5) and b4[-1] == pytest.approx(0.005)
    c = base_betas("cosine", 1000)
    assert c.max() == pytest.approx(0.999)
    # ᾱ(t) = cos²(((t/T)+s)/(1+s) π/2) / cos²(s/(1+s) π/2)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(np.cumprod(1 - c)[:500], f(np.arange(1, 501)) / f(0), rtol=1e-9)


def test_posterior_mean_is_the_gaussian_posterior():
    s = make_schedule("cosine", 100)
    i = jnp.array([0, 5, 50, 99])
    x0 = jnp.ones((4, 3)) * 0.7
    xt = jnp.ones((4, 3)) * -0.2
    mean, var, logvar = q_posterior(s, x0, xt, i)
    ac = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(i)]
    acp = np.asarray(s.alphas_cumprod_prev, np.float64)[np.asarray(i)]
    b = np.asarray(s.betas, np.float64)[np.asarray(i)]
    expect = (np.sqrt(acp) * b * 0.7 + np.sqrt(1 - b) * (1 - acp) * -0.2) / (1 - ac)
    np.testing.assert_allclose(np.asarray(mean[:, 0]), expect, rtol=1e-4, atol=2e-5)
    assert mean.shape == (4, 3) and var.shape == (4, 1) and logvar.shape == (4, 1)


def test_q_sample_statistics():
    s = make_schedule("linear", 1000)
    x0 = jnp.full((20000, 1), 2.0)
    i = jnp.full((20000,), 300)
    xt = q_sample(s, x0, i, jax.random.normal(jax.random.key(0), x0.shape))
    a = float(s.alphas_cumprod[300])
    assert float(xt.mean()) == pytest.approx(2 * np.sqrt(a), abs=0.02)
    assert float(xt.var()) == pytest.approx(1 - a, rel=0.03)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("spec", ["1000", "ddim1000", 1000])
def test_respacing_to_full_T_is_exact(kind, spec):
    s = make_schedule(kind, 1000)
    r = respace(s, spec)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(r)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("spec", ["64", "ddim50", "10,10,7", "250"])
def test_respaced_betas_keep_alpha_bar(kind, spec):
    s = make_schedule(kind, 1000)
    r = respace(s, spec)
    ts = np.asarray(r.timesteps)
    assert np.all(np.diff(ts) > 0)
    np.testing.assert_allclose(np.asarray(r.alphas_cumprod), np.asarray(s.alphas_cumprod)[ts],
                               rtol=1e-5, atol=1e-9)
    # recomputing ᾱ from the respaced betas gives the kept ᾱ (this is what the sampler uses)
    np.testing.assert_allclose(np.cumprod(1 - np.asarray(r.betas, np.float64)),
                               np.asarray(s.alphas_cumprod)[ts], rtol=1e-5, atol=1e-9)
    assert r.base_num_timesteps == 1000


def test_space_timesteps_forms():
    assert list(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    ev = space_timesteps(1000, "64")
    assert len(ev) == 64 and ev[0] == 0 and ev[-1] == 999
    sec = space_timesteps(300, "10,10,7")
    assert len(sec) == 27
    assert sec[0] == 0 and sec[9] == 99 and sec[10] == 100 and sec[19] == 199 and sec[-1] == 299
    assert len(space_timesteps(1000, "ddim64")) == 64


def test_respace_of_respaced_picks_among_kept():
    s = make_schedule("cosine", 1000)
    r = respace(respace(s, "100"), "10")
    direct = respace(s, "100")
    kept = np.asarray(direct.timesteps)[space_timesteps(100, "10")]
    np.testing.assert_array_equal(np.asarray(r.timesteps), kept)
    np.testing.assert_allclose(np.asarray(r.alphas_cumprod), np.asarray(s.alphas_cumprod)[kept],
                               rtol=1e-6)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule kind 'quadratic'.*linear, cosine"):
        make_schedule("quadratic", 1000)
    s = make_schedule("linear", 100)
    with pytest.raises(ValueError, match="101 sampling steps, more than.*T = 100"):
        respace(s, "101")
    with pytest.raises(ValueError, match="more than"):
        respace(s, "ddim200")
    with pytest.raises(ValueError, match="section 1 has 50 timesteps but asks for 60"):
        respace(s, "10,60")
    with pytest.raises(ValueError, match="expected a step count"):
        respace(s, "fast")


def test_schedule_is_a_pytree_usable_under_jit():
    s = respace(make_schedule("cosine", 1000), "50")
    f = jax.jit(lambda sch, x: q_sample(sch, x, jnp.zeros(2, jnp.int32), x))
    assert f(s, jnp.ones((2, 3))).shape == (2, 3)
    assert jax.tree.structure(s) == jax.tree.structure(respace(make_schedule("cosine", 1000), "50"))
