"""Schedule arrays against diffusers' DDPM / DDIM schedulers (``make parity`` only)."""

import numpy as np
import pytest

from unclip_jax.diffusion import make_schedule, respace

pytestmark = pytest.mark.parity


def _diffusers():
    pytest.importorskip("torch")
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("kind,name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_ddpm_schedule_arrays_match_diffusers(kind, name):
    diffusers = _diffusers()
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                  beta_schedule=name)
    ours = make_schedule(kind, 1000)
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(),
                               atol=1e-6)
    # diffusers' posterior variance: β_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t), t = 0 … T-1
    ref_var = np.array([float(ref._get_variance(t)) for t in range(1000)])
    # diffusers clamps the t = 0 variance to 1e-20 (ours is exactly 0: β̃_0 = 0)
    np.testing.assert_allclose(np.asarray(ours.posterior_variance)[1:], ref_var[1:], atol=1e-6)
    assert ref_var[0] <= 1e-20 and float(ours.posterior_variance[0]) == 0.0


@pytest.mark.parametrize("kind,name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("steps", [50, 64, 27])
def test_ddim_respaced_alphas_match_diffusers(kind, name, steps):
    diffusers = _diffusers()
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                  beta_schedule=name, set_alpha_to_one=True,
                                  timestep_spacing="leading", steps_offset=0)
    ref.set_timesteps(steps)
    ts = ref.timesteps.numpy()[::-1]                      # ascending
    ours = respace(make_schedule(kind, 1000), f"ddim{steps}")
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ts)
    ac = ref.alphas_cumprod.numpy()
    # the per-step ᾱ_t and ᾱ_prev diffusers' DDIM step uses (prev = t − T/steps, or 1 at the end)
    prev = np.array([ac[t - 1000 // steps] if t - 1000 // steps >= 0 else 1.0 for t in ts])
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ac[ts], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod_prev), prev, atol=1e-6)
    # DDIM η=1 variance (diffusers' _get_variance) equals our respaced posterior variance
    ref_var = np.array([float(ref._get_variance(t, t - 1000 // steps)) for t in ts])
    np.testing.assert_allclose(np.asarray(ours.posterior_variance), ref_var, atol=1e-6)
