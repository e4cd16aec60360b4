"""The one place where the unCLIP stages are sampled: the prior's image embeddings, the
decoder's images, the upsampler stages — pure functions of configs, params and inputs over the
shared diffusion sampler (:mod:`unclip_jax.core.diffusion`), so the text → image pipelines
(:mod:`unclip_jax.pipelines.unclip`, inside one ``jit``), the training tasks' sample grids and
evaluations, and the model-level helpers below all draw the same samples for the same inputs.

Schedules follow each config's ``sample_spacing`` ("even", "unclip" — diffusers'
``UnCLIPScheduler`` grid, "logsnr", "dpm"); they are built outside ``jit`` (respacing runs in
numpy). The helpers at the end (:class:`PriorSampler`, :func:`sample_images`,
:func:`upsample_images`) jit one stage with the model's own settings for callers that hold one
model: a notebook, a sample grid, an evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from unclip_jax.core import diffusion
from unclip_jax.models import decoder as D
from unclip_jax.models.decoder import (DecoderConfig, UpsamplerConfig, batched, encode_caption,
                                       fit_tokens, null_cond, make_upsampler_denoiser)
from unclip_jax.models.prior import (DiffusionPrior, PriorConfig, clip_range, condition,
                                     from_model_space, repeat_candidates, rerank, uncondition)
from unclip_jax.models.prior import make_denoiser as make_prior_denoiser

SPACINGS = ("even", "unclip", "logsnr", "dpm")  # sample_spacing values (see stage_schedule)


def check_choice(what: str, value, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{what} = {value!r} is not supported; accepted: "
                         f"{', '.join(map(repr, accepted))}")


def upsampler_stages(upsamplers: Sequence[UpsamplerConfig]) -> tuple[tuple[int, ...], ...]:
    """The sampling stages of an upsampler list: indices ``(i,)``, or ``(i, i + 1)`` where
    upsampler ``i + 1`` has ``last_step`` (it takes over stage ``i``'s final step; both must
    have the same sizes and outputs). ValueError for a ``last_step`` upsampler with no stage
    (or a stage that already has one) before it."""
    stages: list[tuple[int, ...]] = []
    for i, up in enumerate(upsamplers):
        if not up.last_step:
            stages.append((i,))
            continue
        if not stages or len(stages[-1]) == 2:
            raise ValueError(f"upsampler {i} runs only the last step of the stage before it "
                             f"(last_step=True), but no upsampler stage precedes it; accepted: "
                             f"it right after its stage's main upsampler (Karlo: "
                             f"super_res_first, then super_res_last)")
        main = upsamplers[stages[-1][0]]
        mine = (up.low_res_size, up.image_size, up.learned_variance, up.model_output)
        theirs = (main.low_res_size, main.image_size, main.learned_variance, main.model_output)
        if mine != theirs:
            raise ValueError(f"upsampler {i} (last_step) has low_res_size, image_size, "
                             f"learned_variance, model_output = {mine}, its stage's upsampler "
                             f"{stages[-1][0]} has {theirs}; they must agree")
        stages[-1] = stages[-1] + (i,)
    return tuple(stages)


def stage_schedule(kind: str, num_timesteps: int, steps: int, spacing: str = "even"):
    """A stage's sampling schedule: ``steps`` of the ``kind`` schedule, spaced "even" (our
    :func:`~unclip_jax.core.diffusion.respace`, ``round(k·(T−1)/(n−1))``), "unclip" (diffusers'
    ``UnCLIPScheduler``: the same rule in its float arithmetic, which rounds some ties — e.g.
    499.5 at 27 steps — the other way; :func:`unclip_jax.core.diffusion.karlo_schedule`) or
    "logsnr" (evenly in log-SNR, ``respace(…, "logsnrN")``) or "dpm" (diffusers'
    ``DPMSolverMultistepScheduler`` grid, ``respace(…, "dpmN")``): the grids the multistep
    DPM-Solver++ samplers want at few steps (docs/solvers.md)."""
    check_choice("sample_spacing", spacing, SPACINGS)
    if spacing in ("logsnr", "dpm"):
        return diffusion.make_schedule(kind, num_timesteps, f"{spacing}{int(steps)}")
    if spacing == "unclip":
        return diffusion.karlo_schedule(int(steps), num_timesteps, kind)
    return diffusion.make_schedule(kind, num_timesteps, str(int(steps)))


def prior_schedule(cfg: PriorConfig, steps: int) -> diffusion.Schedule:
    """The prior's sampling schedule (``cfg.sample_spacing``; "even" is what
    :class:`PriorSampler` uses)."""
    return stage_schedule(cfg.schedule, cfg.num_timesteps, steps, cfg.sample_spacing)


def prior_embeddings(cfg: PriorConfig, params, text_emb, text_states, tokens, rng, guidance,
                     *, schedule, method: str, eta: float, num_candidates: int,
                     text_mask: jax.Array | None = None, uncond: dict | None = None,
                     guided: bool = True, batch_sharding=None) -> jax.Array:
    """Image embeddings ``[B, E]`` (unit norm with ``cfg.renormalize``): ``k`` guided draws
    per caption through the shared sampler, the best by dot product with ``text_emb`` kept.
    ``text_emb`` in the prior's convention (``cfg.unit_text_emb``); ``text_mask`` None: the
    non-pad tokens. ``uncond`` (``text_emb``, ``text_states``, ``text_mask``, batched like the
    captions): the guidance's unconditional input; None = the learned nulls, which a prior with
    ``uncond="empty_caption"`` does not have (ValueError). Schedules are built outside ``jit``
    (respacing runs in numpy)."""
    k = num_candidates
    cond = condition(cfg, {"text_emb": text_emb, "text_states": text_states,
                             "text_tokens": tokens})
    if text_mask is not None:
        cond["text_mask"] = jnp.asarray(text_mask, jnp.bool_)
    cond_k = repeat_candidates(cond, k)
    if not guided:            # scale 1: the conditional branch alone (same result, half the work)
        uncond_k, guidance = None, 1.0
    elif uncond is None:
        if cfg.uncond != "learned":
            raise ValueError(f"this prior has no learned nulls (uncond={cfg.uncond!r}): pass "
                             f"uncond, the empty caption's CLIP encoding")
        uncond_k = uncondition(params, cfg, cond_k)
    else:
        uncond_k = repeat_candidates(
            {"text_emb": jnp.asarray(uncond["text_emb"], jnp.float32),
             "text_states": jnp.asarray(uncond["text_states"], jnp.float32),
             "text_mask": jnp.asarray(uncond["text_mask"], jnp.bool_)}, k)
    x = diffusion.sample(
        make_prior_denoiser(DiffusionPrior(cfg)), params,
        schedule=schedule, rng=rng,
        shape=(k * text_emb.shape[0], cfg.embed_dim), cond=cond_k,
        uncond=uncond_k, method=method, eta=eta,
        guidance_scale=guidance, model_output="x0", clip_x0=clip_range(cfg),
        batch_sharding=batch_sharding and batch_sharding(2))
    emb = from_model_space(cfg, x, cfg.renormalize)
    return rerank(emb.reshape(k, text_emb.shape[0], -1), text_emb)


def decoder_conds(cfg: DecoderConfig, params, image_emb: jax.Array,
                  tokens: jax.Array | None = None, clip_text: dict | None = None,
                  uncond_clip_text: dict | None = None,
                  empty_caption: dict | None = None) -> tuple[dict, dict]:
    """``(cond, uncond)`` of the decoder for embeddings ``[B, E]``. Without ``tokens`` a
    caption-conditioned decoder gets its learned null caption in both branches. A decoder
    reading CLIP text features (``clip_text_width > 0``, Karlo) needs ``clip_text`` and
    ``uncond_clip_text`` (``{"emb": [B, E] raw, "states": [B, L, W], "valid": [B, L]}``; Karlo's
    uncond is the empty caption's encoding), or, with no caption (image manipulations),
    ``empty_caption`` (``params["empty_caption"]``, unbatched) for both."""
    b = image_emb.shape[0]
    if cfg.clip_text_width > 0 and clip_text is None and empty_caption is not None:
        clip_text = uncond_clip_text = batched(empty_caption, b)
    uncond = batched(null_cond(params, cfg), b)
    cond = {"image_emb": jnp.asarray(image_emb, jnp.float32)}
    if cfg.use_text:
        cond["text"] = (uncond["text"] if tokens is None else encode_caption(
            params, cfg, fit_tokens(tokens, cfg.context_length, cfg.pad_id)))
    if cfg.clip_text_width > 0:
        if clip_text is None or uncond_clip_text is None:
            raise ValueError("this decoder reads CLIP text features (clip_text_width > 0): "
                             "pass clip_text and uncond_clip_text (the caption's and the "
                             "empty caption's CLIP encodings)")
        cond["clip_text"], uncond["clip_text"] = clip_text, uncond_clip_text
    return cond, uncond


def decode(cfg: DecoderConfig, params, image_emb, rng, guidance, *, schedule,
           method: str = "ddim", eta=0.0, tokens=None, x_T=None,
           clip_x0: tuple[float, float] | None = (-1.0, 1.0), clip_text: dict | None = None,
           uncond_clip_text: dict | None = None, empty_caption: dict | None = None,
           batch_sharding=None) -> jax.Array:
    """Decoder images ``[B, S, S, 3]`` from embeddings ``[B, E]`` (guided, shared sampler).
    ``batch_sharding``: None, or ``ndim -> Sharding`` splitting the batch axis (see
    :func:`sampling_mesh`)."""
    cond, uncond = decoder_conds(cfg, params, image_emb, tokens, clip_text, uncond_clip_text,
                                 empty_caption)
    s = cfg.image_size
    return diffusion.sample(
        D.make_denoiser(cfg), params, schedule=schedule, rng=rng,
        shape=None if x_T is not None else (image_emb.shape[0], s, s, 3), x_T=x_T, cond=cond,
        uncond=uncond, method=method, eta=eta, guidance_scale=guidance,
        model_output=cfg.model_output,
        variance="learned" if cfg.learned_variance else "fixed_small", clip_x0=clip_x0,
        batch_sharding=batch_sharding and batch_sharding(4),
        guidance_interval=D.guidance_interval(cfg), self_condition=cfg.self_condition > 0)


def decoder_schedule(cfg: DecoderConfig, steps: int | str):
    """The decoder's schedule: ``steps`` spaced by ``cfg.sample_spacing``; a string is a
    :func:`~unclip_jax.core.diffusion.respace` spec (e.g. "ddim50")."""
    if isinstance(steps, str) and not steps.isdigit():
        return diffusion.make_schedule(cfg.schedule, cfg.num_timesteps, steps)
    return stage_schedule(cfg.schedule, cfg.num_timesteps, int(steps), cfg.sample_spacing)


def upsampler_schedules(cfgs: Sequence[UpsamplerConfig], steps: Sequence[int]) -> tuple:
    """One schedule per upsampler stage (:func:`upsampler_stages`), its main upsampler's."""
    return tuple(stage_schedule(cfgs[st[0]].schedule, cfgs[st[0]].num_timesteps, int(n),
                                cfgs[st[0]].sample_spacing)
                 for st, n in zip(upsampler_stages(cfgs), steps))


def stage_denoiser(cfgs: Sequence[UpsamplerConfig], stage: tuple[int, ...],
                   schedule: diffusion.Schedule):
    """The denoiser of one upsampler stage; with a last-step network, ``params`` is the pair
    and the network switches at the schedule's first timestep (the final sampling step), one
    branch evaluated per step (``lax.cond``)."""
    main = make_upsampler_denoiser(cfgs[stage[0]])
    if len(stage) == 1:
        return main
    last = make_upsampler_denoiser(cfgs[stage[1]])

    def denoiser(params, x_t, t, cond):
        return jax.lax.cond(t[0] == schedule.timesteps[0],
                            lambda: last(params[1], x_t, t, cond),
                            lambda: main(params[0], x_t, t, cond))

    return denoiser


def upsample_stage(cfgs: Sequence[UpsamplerConfig], stage: tuple[int, ...], params, x, rng, *,
                   schedule: diffusion.Schedule, method: str | None = None, eta=0.0,
                   x_T: jax.Array | None = None, batch_sharding=None) -> jax.Array:
    """One upsampler stage on ``[B, h, w, 3]`` in [-1, 1] → ``[B, f·h, f·w, 3]``, run fully
    convolutionally (``params``: the stage's, a pair with a last-step network)."""
    cfg = cfgs[stage[0]]
    shape = (x.shape[0], x.shape[1] * cfg.factor, x.shape[2] * cfg.factor, 3)
    return diffusion.sample(
        stage_denoiser(cfgs, stage, schedule), params, schedule=schedule, rng=rng,
        shape=None if x_T is not None else shape, x_T=x_T, cond={"low_res": x},
        method=method or cfg.sample_method, eta=eta, model_output=cfg.model_output,
        variance="learned" if cfg.learned_variance else "fixed_small",
        clip_x0=(-1.0, 1.0), batch_sharding=batch_sharding and batch_sharding(4))


def upsample_chain(cfgs: Sequence[UpsamplerConfig], params: Sequence, x: jax.Array, rng, *,
                   schedules: Sequence[diffusion.Schedule], method: str | None = None,
                   eta=0.0, batch_sharding=None) -> jax.Array:
    """Run the upsampler stages in order on ``[B, h, h, 3]`` in [-1, 1] (``schedules`` from
    :func:`upsampler_schedules`, one per stage; ``method`` None: each stage's
    ``sample_method``); each input must have its stage's ``low_res_size`` (ValueError
    otherwise). Stage ``k`` draws its noise from ``fold_in(rng, k)``."""
    for k, (stage, sched) in enumerate(zip(upsampler_stages(cfgs), schedules)):
        i, cfg = stage[0], cfgs[stage[0]]
        if x.ndim != 4 or x.shape[1:] != (cfg.low_res_size, cfg.low_res_size, 3):
            raise ValueError(f"upsampler {i} got input of shape {tuple(x.shape)}; its config "
                             f"takes [B, {cfg.low_res_size}, {cfg.low_res_size}, 3] "
                             f"({cfg.low_res_size} → {cfg.image_size})")
        p = params[i] if len(stage) == 1 else tuple(params[j] for j in stage)
        x = upsample_stage(cfgs, stage, p, x, jax.random.fold_in(rng, k), schedule=sched,
                           method=method, eta=eta, batch_sharding=batch_sharding)
    return x



# ============================================================================ one model at a time


class PriorSampler:
    """``sampler(inputs, rng) -> [B, E]`` image embeddings (unit norm with ``renormalize``):
    :func:`prior_embeddings` jitted with one prior's settings.

    ``inputs``: ``text_emb [B, E]``, ``text_states [B, L, W]``, ``text_tokens [B, L]`` (and
    optionally ``text_mask [B, L]``; default the non-pad tokens); ``uncond`` (optional, batched
    like them, with ``text_mask``): the unconditional input of a prior without learned nulls
    (Karlo: the empty caption's encoding). ``num_candidates · B``
    draws, the best per caption kept; ``guidance_scale`` and ``eta`` are traced (new values
    reuse the compiled program); the schedule follows the config's ``sample_spacing``.
    """

    def __init__(self, model: DiffusionPrior, params, *, sample_steps: int | None = None,
                 sample_method: str | None = None, eta: float | None = None,
                 guidance_scale: float | None = None, num_candidates: int | None = None,
                 renormalize: bool | None = None):
        cfg = model.config
        pick = lambda v, d: d if v is None else v  # noqa: E731
        self.model, self.params = model, params
        self.steps = int(pick(sample_steps, cfg.sample_steps))
        self.method = pick(sample_method, cfg.sample_method)
        self.eta = float(pick(eta, cfg.eta))
        self.guidance_scale = float(pick(guidance_scale, cfg.guidance_scale))
        self.num_candidates = int(pick(num_candidates, cfg.num_candidates))
        self.renormalize = bool(pick(renormalize, cfg.renormalize))
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates must be ≥ 1, got {self.num_candidates}")
        self.cfg = dataclasses.replace(cfg, renormalize=self.renormalize)
        self.schedule = prior_schedule(self.cfg, self.steps)
        self._programs: dict[bool, types.SimpleNamespace] = {}

    def sampler(self, n: int, guided: bool = True) -> types.SimpleNamespace:
        """The jitted program (``.jitted``) drawing the embeddings, with or without the
        unconditional branch (one compilation per batch size)."""
        if guided not in self._programs:
            run = functools.partial(prior_embeddings, self.cfg, schedule=self.schedule,
                                    method=self.method, num_candidates=self.num_candidates,
                                    guided=guided)
            self._programs[guided] = types.SimpleNamespace(jitted=jax.jit(
                lambda params, inputs, rng, scale, eta, uncond: run(
                    params, inputs["text_emb"], inputs["text_states"], inputs["text_tokens"],
                    rng, scale, eta=eta, text_mask=inputs.get("text_mask"), uncond=uncond)))
        return self._programs[guided]

    def __call__(self, inputs: dict, rng, guidance_scale=None, eta=None,
                 uncond: dict | None = None) -> jax.Array:
        """Embeddings ``[B, E]``. ``guidance_scale``/``eta`` override the defaults (traced). A
        guidance scale of exactly 1 given as a Python number skips the unconditional half of
        the batch (same result, half the work)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        guided = not (isinstance(scale, (int, float)) and scale == 1.0)
        if guided and uncond is None and self.cfg.uncond != "learned":
            raise ValueError(f"this prior has no learned nulls (uncond={self.cfg.uncond!r}): "
                             f"pass uncond, the empty caption's CLIP encoding")
        inputs = {k: jnp.asarray(inputs[k]) for k in ("text_emb", "text_states", "text_tokens",
                                                      "text_mask") if k in inputs}
        n = self.num_candidates * inputs["text_emb"].shape[0]
        return self.sampler(n, guided).jitted(
            self.params, inputs, rng, jnp.float32(scale if guided else 1.0),
            jnp.float32(self.eta if eta is None else eta), uncond)


@functools.lru_cache(maxsize=16)
def _decode_program(cfg: DecoderConfig, steps: int, method: str):
    schedule = decoder_schedule(cfg, steps)
    return jax.jit(lambda params, emb, rng, scale, eta, tokens, x_T, clip_text, uncond_text:
                   decode(cfg, params, emb, rng, scale, schedule=schedule, method=method,
                          eta=eta, tokens=tokens, x_T=x_T, clip_text=clip_text,
                          uncond_clip_text=uncond_text))


def sample_images(params, cfg: DecoderConfig, image_emb: jax.Array,
                  tokens: jax.Array | None = None, rng: jax.Array | None = None,
                  guidance_scale: float | None = None, steps: int | None = None,
                  method: str | None = None, eta: float = 0.0,
                  x_T: jax.Array | None = None, clip_text: dict | None = None,
                  uncond_clip_text: dict | None = None) -> jax.Array:
    """Images ``[B, S, S, 3]`` in [-1, 1] from CLIP image embeddings ``[B, E]`` (and caption
    tokens ``[B, L]`` when the decoder has a caption encoder): :func:`decode` jitted with the
    decoder's own settings (``steps``, ``method``, ``guidance_scale`` None: the config's
    ``sample_steps``, ``sample_method``, ``guidance_scale``; spacing ``sample_spacing``),
    guided against the learned nulls. ``guidance_scale`` and ``eta`` are traced. A
    ``clip_text_width > 0`` decoder (Karlo) also takes the CLIP text features ``clip_text``
    (``{"emb": [B, E] raw, "states": [B, L, W], "valid": [B, L]}``) and their unconditional
    counterpart ``uncond_clip_text`` (the empty caption's encoding: it has no learned null
    text)."""
    image_emb = jnp.asarray(image_emb, jnp.float32)
    if image_emb.ndim != 2 or image_emb.shape[1] != cfg.clip_dim:
        raise ValueError(f"image_emb has shape {image_emb.shape}; expected [B, {cfg.clip_dim}]")
    if cfg.clip_text_width > 0 and uncond_clip_text is None:
        raise ValueError("this decoder has no learned null text: pass uncond_clip_text "
                         "(the empty caption's CLIP encoding, batched)")
    if cfg.use_text and tokens is None:
        raise ValueError("this decoder has a caption encoder: pass caption tokens")
    program = _decode_program(cfg, int(steps or cfg.sample_steps), method or cfg.sample_method)
    scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
    return program(params, image_emb, jax.random.PRNGKey(0) if rng is None else rng,
                   jnp.float32(scale), jnp.float32(eta),
                   None if tokens is None else jnp.asarray(tokens, jnp.int32), x_T, clip_text,
                   uncond_clip_text)


@functools.lru_cache(maxsize=16)
def _upsample_program(cfg: UpsamplerConfig, steps: int, method: str):
    schedule = upsampler_schedules([cfg], [steps])[0]
    return jax.jit(lambda params, low, rng, eta, x_T: upsample_stage(
        [cfg], (0,), params, low, rng, schedule=schedule, method=method, eta=eta, x_T=x_T))


def upsample_images(params, cfg: UpsamplerConfig, low_res: jax.Array,
                    rng: jax.Array | None = None, steps: int | None = None,
                    method: str | None = None, eta: float = 0.0,
                    x_T: jax.Array | None = None) -> jax.Array:
    """``[B, h, w, 3]`` in [-1, 1] → ``[B, f·h, f·w, 3]``: one :func:`upsample_stage` jitted
    with the upsampler's own settings (``steps``/``method`` None: ``sample_steps`` /
    ``sample_method``, spacing ``sample_spacing``), run fully convolutionally on the whole
    image (any size the U-Net's levels divide)."""
    low_res = jnp.asarray(low_res, jnp.float32)
    if low_res.ndim != 4 or low_res.shape[-1] != 3:
        raise ValueError(f"low_res must be [B, h, w, 3], got {low_res.shape}")
    d = 2 ** (len(cfg.channel_mult) - 1)
    h, w = low_res.shape[1] * cfg.factor, low_res.shape[2] * cfg.factor
    if h % d or w % d:
        raise ValueError(f"target {h}×{w} (low-res × {cfg.factor}) is not divisible by the "
                         f"U-Net's downsampling factor {d}")
    program = _upsample_program(cfg, int(steps or cfg.sample_steps), method or cfg.sample_method)
    return program(params, low_res, jax.random.PRNGKey(0) if rng is None else rng,
                   jnp.float32(eta), x_T)
