"""Schedule arrays against diffusers' DDPM / DDIM schedulers (``make parity`` only)."""

import numpy as np
import pytest

from unclip_jax.core.diffusion import make_schedule, respace

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


# ----------------------------------------------------------------------------- solvers
#
# The shared sampler against diffusers' schedulers on Gaussian data N(MU, SIG²) with the exact
# denoiser (closed form), the same x_T and, for DDPM, the same per-step noise. Helpers are
# module-level so benchmarks/bench_solvers.py builds its table from the same runs.

MU, SIG = 1.5, 0.5
B, D = 4096, 2
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SOLVER_STEPS = (10, 15, 25, 50)
# "At least as accurate" allows this much on |variance error|: float32 round-off between the
# two sides on the identical 2M discretisation. With x₀ and v outputs they agree to < 1e-4;
# with ε on the cosine schedule by up to 5e-4 (10 steps): the first step at t = 999 turns ε
# into x̂₀ = (x − σε)/α with σ/α ≈ 2·10⁴, and diffusers' float32 ᾱ (a float32 cumprod) differs
# from ours (float64, then rounded) there. Our float32 2M matches the float64 restatement.
SOLVER_TOL = 1e-3


def standard_x_T(seed: int = 0) -> np.ndarray:
    """``[B, D]`` float32 noise with per-dimension sample mean exactly 0 and variance 1."""
    z = np.random.default_rng(seed).normal(size=(B, D))
    return ((z - z.mean(0)) / z.std(0)).astype(np.float32)


def _exact_outputs(ac, x, model_output):
    """The exact denoiser's output for x_t at ᾱ = ``ac`` (numpy or torch, broadcasting)."""
    a = ac ** 0.5
    s = (1 - ac) ** 0.5
    x0 = MU + a * SIG ** 2 / (ac * SIG ** 2 + 1 - ac) * (x - a * MU)
    eps = (x - a * x0) / s
    return {"x0": x0, "eps": eps, "v": a * eps - s * x0}[model_output]


def ours(kind: str, spec: str, method: str, model_output: str, x_T, **kw) -> np.ndarray:
    """Our sampler's samples ``[B, D]`` on ``respace(make_schedule(kind, 1000), spec)``."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.core.diffusion import sample

    base = make_schedule(kind, 1000)
    sched = respace(base, spec)

    def denoiser(params, x, t, cond):
        return _exact_outputs(base.alphas_cumprod[t][:, None], x, model_output)

    fn = jax.jit(lambda r, x: sample(denoiser, None, schedule=sched, rng=r, x_T=x,
                                     method=method, model_output=model_output, **kw))
    return np.asarray(fn(jax.random.key(1), jnp.asarray(x_T)), np.float64)


def reference(scheduler, model_output: str, x_T, steps: int, **step_kw) -> np.ndarray:
    """A diffusers scheduler's samples from ``x_T`` with the exact denoiser."""
    import torch

    scheduler.set_timesteps(steps)
    ac = scheduler.alphas_cumprod
    x = torch.from_numpy(np.asarray(x_T)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = _exact_outputs(ac[int(t)], x, model_output)
        x = scheduler.step(out, t, x, **step_kw).prev_sample
    return x.numpy().astype(np.float64)


def dpm_reference(kind: str, model_output: str, steps: int, x_T, order: int = 2):
    """``DPMSolverMultistepScheduler`` with its defaults (``solver_order`` 2, or 3)."""
    diffusers = _diffusers()
    s = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
        beta_schedule=SCHEDULES[kind], prediction_type=PREDICTION[model_output],
        solver_order=order)
    return reference(s, model_output, x_T, steps)


def variance_error(x: np.ndarray) -> float:
    """Relative error of the samples' variance against the data's σ²."""
    return float(x.var() / SIG ** 2 - 1)


def solver_row(kind: str, model_output: str, steps: int, x_T) -> dict:
    """Final variance errors at ``steps``: ours 2M / 3M on the reference's grid ("dpmN") and
    2M on the evenly spaced grid, diffusers' 2M (its default) and 3M."""
    return {
        "ours_2m": variance_error(ours(kind, f"dpm{steps}", "dpmpp_2m", model_output, x_T)),
        "ours_3m": variance_error(ours(kind, f"dpm{steps}", "dpmpp_3m", model_output, x_T)),
        "ours_2m_even": variance_error(ours(kind, str(steps), "dpmpp_2m", model_output, x_T)),
        "ref_2m": variance_error(dpm_reference(kind, model_output, steps, x_T, 2)),
        "ref_3m": variance_error(dpm_reference(kind, model_output, steps, x_T, 3)),
    }


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("model_output", list(PREDICTION))
def test_multistep_solvers_at_least_as_accurate_as_diffusers(kind, model_output):
    """Issue 22: at 10, 15, 25 and 50 steps, |variance error| of our 2M and 3M ≤ that of
    ``DPMSolverMultistepScheduler`` with its default options (2M), and our 3M ≤ its 3M, on
    the same schedule, prediction type and number of steps (our grid "dpmN" is its default
    timesteps; 2M there takes exactly its steps)."""
    x_T = standard_x_T()
    for steps in SOLVER_STEPS:
        r = solver_row(kind, model_output, steps, x_T)
        assert abs(r["ours_2m"]) <= abs(r["ref_2m"]) + SOLVER_TOL, (steps, r)
        same = 1e-3 if (kind, model_output) == ("cosine", "eps") else 1e-4
        assert abs(r["ours_2m"] - r["ref_2m"]) < same, (steps, r)     # the same steps
        assert abs(r["ours_3m"]) <= abs(r["ref_2m"]) + SOLVER_TOL, (steps, r)
        assert abs(r["ours_3m"]) <= abs(r["ref_3m"]) + SOLVER_TOL, (steps, r)


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("model_output", list(PREDICTION))
def test_ddim_equals_diffusers(kind, model_output):
    """DDIM (η = 0) on "ddimN" against ``DDIMScheduler`` (leading spacing, its default),
    sample by sample: without clipping, and with x̂₀ clipped to ±1 (its default
    ``clip_sample``; ours ``clip_x0=(-1, 1)``). Clipped, our step re-derives ε from the clipped
    x̂₀ (guided-diffusion's DDIM), which is diffusers' ``use_clipped_model_output=True``; its
    default keeps the model's ε (0.16–0.22 apart here)."""
    diffusers = _diffusers()
    x_T = standard_x_T()
    for steps in (10, 50):
        for clip in (False, True):
            s = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4,
                                        beta_end=0.02, beta_schedule=SCHEDULES[kind],
                                        prediction_type=PREDICTION[model_output],
                                        clip_sample=clip)
            want = reference(s, model_output, x_T, steps, eta=0.0,
                             use_clipped_model_output=clip)
            got = ours(kind, f"ddim{steps}", "ddim", model_output, x_T,
                       clip_x0=(-1.0, 1.0) if clip else None)
            np.testing.assert_allclose(got, want, atol=2e-4, err_msg=f"{steps} {clip}")


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_ddpm_equals_diffusers_with_the_same_noise(kind, monkeypatch):
    """DDPM on "ddimN" against ``DDPMScheduler`` with its defaults (leading spacing, fixed
    small variance, x̂₀ clipped to ±1), fed our per-step draws in the order it asks for them."""
    import jax
    import torch

    diffusers = _diffusers()
    from diffusers.schedulers import scheduling_ddpm

    x_T, steps = standard_x_T(), 20
    r_steps = jax.random.split(jax.random.key(1))[1]        # sample()'s per-step keys
    draws = [np.asarray(jax.random.normal(jax.random.fold_in(r_steps, i), (B, D)))
             for i in range(steps - 1, 0, -1)]
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(draws.pop(0)))
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                beta_schedule=SCHEDULES[kind])
    want = reference(s, "eps", x_T, steps)
    assert not draws                                      # every draw used, in order
    got = ours(kind, f"ddim{steps}", "ddpm", "eps", x_T, clip_x0=(-1.0, 1.0))
    np.testing.assert_allclose(got, want, atol=2e-4)
