"""Diffusion core shared by every diffusion model: schedules, objectives and the one sampler.

* :mod:`.schedule` — linear / cosine betas, ᾱ, ``q_sample``, the posterior, respacing (and
  Karlo's ``UnCLIPScheduler`` grid, ``karlo_schedule``).
* :mod:`.losses` — ε / x₀ / v conversions, L_simple, learned variance + hybrid loss,
  timestep sampling, conditioning dropout, self-conditioning, ``training_loss``.
* :mod:`.sampler` — ``sample`` / ``make_sampler`` (DDPM, DDIM η, DPM-Solver++(2M) and (3M),
  classifier-free guidance in one batched forward) and ``ddim_invert``.
"""

from unclip_jax.core.diffusion.losses import (
    MODEL_OUTPUTS,
    TIMESTEP_SAMPLINGS,
    check_self_condition,
    check_timestep_sampling,
    condition_keep_mask,
    drop_condition,
    eps_to_x0,
    learned_log_variance,
    output_to_x0_eps,
    sample_timesteps,
    training_loss,
    v_target,
    v_to_eps,
    v_to_x0,
    vlb_term,
    x0_eps_to_output,
    x0_to_eps,
)
from unclip_jax.core.diffusion.sampler import (
    METHODS,
    VARIANCES,
    Sampler,
    check_guidance_interval,
    ddim_invert,
    make_sampler,
    sample,
)
from unclip_jax.core.diffusion.schedule import (
    KINDS,
    Schedule,
    base_betas,
    from_betas,
    karlo_schedule,
    karlo_timesteps,
    make_schedule,
    q_posterior,
    q_sample,
    respace,
    space_timesteps,
)

__all__ = [
    "KINDS", "METHODS", "MODEL_OUTPUTS", "TIMESTEP_SAMPLINGS", "VARIANCES", "Sampler",
    "Schedule", "base_betas", "check_guidance_interval", "check_self_condition",
    "check_timestep_sampling",
    "condition_keep_mask", "ddim_invert",
    "drop_condition", "eps_to_x0", "from_betas", "karlo_schedule", "karlo_timesteps",
    "learned_log_variance", "make_sampler", "make_schedule", "output_to_x0_eps", "q_posterior",
    "q_sample", "respace", "sample", "sample_timesteps", "space_timesteps", "training_loss",
    "v_target", "v_to_eps", "v_to_x0", "vlb_term", "x0_eps_to_output", "x0_to_eps",
]
