"""unCLIP text → image (Ramesh et al. 2022) as one pure function under one ``jax.jit``.

The chain (DESIGN §3): caption tokens ``[B, L]`` → CLIP text tower (token states ``[B, L, W]``
and unit-norm text embedding ``[B, E]``) → diffusion prior (the shared sampler, classifier-free
guidance, ``k`` candidates per caption, the one with the highest dot product with the text
embedding kept) → decoder (the shared sampler, guided against its learned nulls) →
upsampler(s) (the shared sampler, few-step DDIM, no guidance) → images ``[B, H, W, 3]`` in
[-1, 1]. Every stage is a pure function of its params; :func:`make_text_to_image` composes them
into ``fn(params, tokens, rng, guidance)``. Static (one compile per value and input shape):
step counts, methods, η, ``num_candidates``. Traced: ``guidance = (prior_scale,
decoder_scale)``, so new guidance scales never recompile.

From a notebook, three lines::

    from unclip_jax.pipelines import unclip
    model = unclip.load_unclip("runs/demo/clip", "runs/demo/tokenizer.model", "runs/demo/prior", "runs/demo/decoder", ["runs/demo/upsampler"])
    images = unclip.generate(model, ["a big red circle above a small blue square"], seed=0)  # uint8 [1, H, W, 3]

For full control: ``fn = unclip.make_text_to_image(model, unclip.Settings(decoder_steps=25))``
then ``fn(model.params, tokens, jax.random.PRNGKey(0), (prior_scale, decoder_scale))``.
Only the diffusion prior runs inside the jitted chain (the AR prior has its own token loop).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion
from unclip_jax.commands.decoder import to_uint8
from unclip_jax.models import decoder as D
from unclip_jax.models import prior as P
from unclip_jax.models.clip import CLIP, CLIPConfig

# ============================================================================ the models


@dataclasses.dataclass(frozen=True, eq=False)
class UnCLIP:
    """The frozen models of the chain: configs (static) and ``params`` (arguments).

    ``params = {"clip": …, "prior": …, "decoder": …, "upsamplers": (…, …)}``; ``tokenizer`` is a
    :class:`unclip_jax.text.Tokenizer` (None: only the token-level API works).
    """

    clip: CLIPConfig
    prior: P.PriorConfig
    decoder: D.DecoderConfig
    upsamplers: tuple[D.UpsamplerConfig, ...]
    params: dict
    tokenizer: Any = None

    @property
    def configs(self) -> tuple:
        """The hashable static part (a cache key for compiled functions)."""
        return (self.clip, self.prior, self.decoder, tuple(self.upsamplers))

    @property
    def resolution(self) -> int:
        """Side of the output images (the last upsampler's, else the decoder's)."""
        return self.upsamplers[-1].image_size if self.upsamplers else self.decoder.image_size


def check_chain(clip: CLIPConfig, prior: P.PriorConfig, decoder: D.DecoderConfig,
                upsamplers: Sequence[D.UpsamplerConfig]) -> None:
    """Raise ValueError unless the models' sizes fit together."""
    if not clip.embed_dim == prior.embed_dim == decoder.clip_dim:
        raise ValueError(f"embedding sizes disagree: CLIP embed_dim {clip.embed_dim}, prior "
                         f"embed_dim {prior.embed_dim}, decoder clip_dim {decoder.clip_dim}; "
                         f"the prior and decoder must be trained on this CLIP")
    if prior.text_width != clip.text_width:
        raise ValueError(f"the prior reads CLIP text states of width {prior.text_width}, the "
                         f"CLIP's text tower has width {clip.text_width}")
    if clip.context_length > prior.context_length:
        raise ValueError(f"the CLIP's {clip.context_length} text tokens exceed the prior's "
                         f"context_length {prior.context_length}")
    size = decoder.image_size
    for i, up in enumerate(upsamplers):
        if up.low_res_size != size:
            raise ValueError(f"upsampler {i} takes {up.low_res_size}×{up.low_res_size} inputs "
                             f"but the stage before it makes {size}×{size} images; accepted: "
                             f"an upsampler whose low_res_size is {size}")
        size = up.image_size


def load_unclip(clip_workdir: str | os.PathLike, tokenizer_path: str | os.PathLike | None,
                prior_workdir: str | os.PathLike, decoder_workdir: str | os.PathLike,
                upsampler_workdirs: Sequence[str | os.PathLike] = (), *,
                ema: bool | None = None) -> UnCLIP:
    """The latest checkpoints of the four kinds of training run, checked to fit together.

    ``tokenizer_path`` None: the CLIP run's own (``data.tokenizer`` or beside its workdir).
    ``ema``: None = EMA params where a run kept them (the decoder and upsamplers; the CLIP and
    prior loaders always take the EMA params when kept).
    """
    from unclip_jax.embeddings import clip_tokenizer_path, load_clip
    from unclip_jax.text import Tokenizer

    if isinstance(upsampler_workdirs, (str, os.PathLike)):
        upsampler_workdirs = [upsampler_workdirs]
    _, clip_params, clip_cfg = load_clip(clip_workdir)
    tok = Tokenizer.load(tokenizer_path or clip_tokenizer_path(clip_workdir))
    prior = P.load_sampler(prior_workdir)
    dec_params, dec_cfg = D.load_decoder(decoder_workdir, ema)
    ups = [D.load_upsampler(w, ema) for w in upsampler_workdirs]
    check_chain(clip_cfg, prior.cfg, dec_cfg, [c for _, c in ups])
    params = {"clip": clip_params, "prior": prior.params, "decoder": dec_params,
              "upsamplers": tuple(p for p, _ in ups)}
    return UnCLIP(clip_cfg, prior.cfg, dec_cfg, tuple(c for _, c in ups),
                  jax.tree.map(jnp.asarray, params), tok)


# ============================================================================ settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static sampling settings (None = the model config's default)."""

    prior_steps: int | None = None          # respaced prior steps (paper: 64)
    prior_method: str | None = None         # "ddim" | "ddpm" | "dpmpp_2m"
    prior_eta: float | None = None
    num_candidates: int | None = None       # k draws per caption, best by dot product kept
    decoder_steps: int | None = None
    decoder_method: str = "ddim"
    decoder_eta: float = 0.0
    upsampler_steps: tuple[int, ...] | None = None   # per upsampler (paper: 27, 15)
    upsampler_method: str = "ddim"
    upsampler_eta: float = 0.0

    def resolved(self, unclip_configs: tuple) -> "Settings":
        _, prior, decoder, ups = unclip_configs
        pick = lambda v, d: d if v is None else v  # noqa: E731
        up_steps = pick(self.upsampler_steps, tuple(u.sample_steps for u in ups))
        if isinstance(up_steps, int):
            up_steps = (up_steps,) * len(ups)
        if len(up_steps) != len(ups):
            raise ValueError(f"upsampler_steps has {len(up_steps)} entries for {len(ups)} "
                             f"upsamplers")
        out = dataclasses.replace(
            self, prior_steps=int(pick(self.prior_steps, prior.sample_steps)),
            prior_method=pick(self.prior_method, prior.sample_method),
            prior_eta=float(pick(self.prior_eta, prior.eta)),
            num_candidates=int(pick(self.num_candidates, prior.num_candidates)),
            decoder_steps=int(pick(self.decoder_steps, decoder.sample_steps)),
            upsampler_steps=tuple(int(s) for s in up_steps))
        if out.num_candidates < 1:
            raise ValueError(f"num_candidates must be ≥ 1, got {out.num_candidates}")
        for name in ("prior_steps", "decoder_steps"):
            if getattr(out, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(out, name)}")
        return out


def settings_from(**kwargs) -> Settings:
    """:class:`Settings` from keyword arguments; an unknown name is an error naming the valid."""
    names = [f.name for f in dataclasses.fields(Settings)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {', '.join(unknown)}; accepted: "
                         f"{', '.join(names)}, prior_guidance, decoder_guidance")
    if isinstance(kwargs.get("upsampler_steps"), list):
        kwargs["upsampler_steps"] = tuple(kwargs["upsampler_steps"])
    return Settings(**kwargs)


# ============================================================================ the stages


def encode_text(clip_cfg: CLIPConfig, clip_params, tokens: jax.Array):
    """CLIP text tower: ``[B, L]`` int32 → (states ``[B, L, W]``, embedding ``[B, E]`` unit)."""
    return CLIP(clip_cfg).apply({"params": clip_params}, tokens,
                                method=CLIP.encode_text_tokens)


def prior_schedule(cfg: P.PriorConfig, steps: int) -> diffusion.Schedule:
    """The prior's sampling schedule (evenly respaced, as :class:`PriorSampler` uses)."""
    return diffusion.respace(P.base_schedule(cfg), str(steps))


def prior_embeddings(cfg: P.PriorConfig, params, text_emb, text_states, tokens, rng, guidance,
                     *, schedule, method: str, eta: float, num_candidates: int) -> jax.Array:
    """Image embeddings ``[B, E]`` (unit norm with ``cfg.renormalize``): ``k`` guided draws
    per caption through the shared sampler, the best by dot product with ``text_emb`` kept.
    Schedules are built outside ``jit`` (respacing runs in numpy)."""
    k = num_candidates
    cond = P.condition(cfg, {"text_emb": text_emb, "text_states": text_states,
                             "text_tokens": tokens})
    cond_k = jax.tree.map(lambda x: jnp.concatenate([x] * k, axis=0), cond)
    x = diffusion.sample(
        P.make_denoiser(P.DiffusionPrior(cfg)), params,
        schedule=schedule, rng=rng,
        shape=(k * text_emb.shape[0], cfg.embed_dim), cond=cond_k,
        uncond=P.uncondition(params, cfg, cond_k), method=method, eta=eta,
        guidance_scale=guidance, model_output="x0")
    emb = P.from_model_space(cfg, x, cfg.renormalize)
    return P.rerank(emb.reshape(k, text_emb.shape[0], -1), text_emb)


def fit_tokens(tokens: jax.Array, length: int, pad_id: int) -> jax.Array:
    """Pad (with ``pad_id``) or cut ``[B, L]`` tokens to ``[B, length]``."""
    if tokens.shape[1] >= length:
        return tokens[:, :length]
    return jnp.pad(tokens, ((0, 0), (0, length - tokens.shape[1])), constant_values=pad_id)


def decoder_conds(cfg: D.DecoderConfig, params, image_emb: jax.Array,
                  tokens: jax.Array | None = None) -> tuple[dict, dict]:
    """``(cond, uncond)`` of the decoder for embeddings ``[B, E]``. Without ``tokens`` a
    caption-conditioned decoder gets its learned null caption in both branches."""
    b = image_emb.shape[0]
    uncond = D.batched(D.null_cond(params, cfg), b)
    cond = {"image_emb": jnp.asarray(image_emb, jnp.float32)}
    if cfg.use_text:
        cond["text"] = (uncond["text"] if tokens is None else D.encode_caption(
            params, cfg, fit_tokens(tokens, cfg.context_length, cfg.pad_id)))
    return cond, uncond


def decode(cfg: D.DecoderConfig, params, image_emb, rng, guidance, *, schedule,
           method: str = "ddim", eta=0.0, tokens=None, x_T=None,
           clip_x0: tuple[float, float] | None = (-1.0, 1.0)) -> jax.Array:
    """Decoder images ``[B, S, S, 3]`` from embeddings ``[B, E]`` (guided, shared sampler)."""
    cond, uncond = decoder_conds(cfg, params, image_emb, tokens)
    s = cfg.image_size
    return diffusion.sample(
        D.make_denoiser(cfg), params, schedule=schedule, rng=rng,
        shape=None if x_T is not None else (image_emb.shape[0], s, s, 3), x_T=x_T, cond=cond,
        uncond=uncond, method=method, eta=eta, guidance_scale=guidance,
        model_output=cfg.model_output,
        variance="learned" if cfg.learned_variance else "fixed_small", clip_x0=clip_x0)


def decoder_schedule(cfg: D.DecoderConfig, steps: int | str):
    return diffusion.make_schedule(cfg.schedule, cfg.num_timesteps, steps)


def upsampler_schedules(cfgs: Sequence[D.UpsamplerConfig], steps: Sequence[int]) -> tuple:
    return tuple(diffusion.make_schedule(c.schedule, c.num_timesteps, int(n))
                 for c, n in zip(cfgs, steps))


def upsample_chain(cfgs: Sequence[D.UpsamplerConfig], params: Sequence, x: jax.Array, rng, *,
                   schedules: Sequence[diffusion.Schedule], method: str = "ddim",
                   eta=0.0) -> jax.Array:
    """Run the upsamplers in order on ``[B, h, h, 3]`` in [-1, 1] (``schedules`` from
    :func:`upsampler_schedules`); each input must have its stage's ``low_res_size``
    (ValueError otherwise)."""
    for i, (cfg, p, sched) in enumerate(zip(cfgs, params, schedules)):
        if x.ndim != 4 or x.shape[1:] != (cfg.low_res_size, cfg.low_res_size, 3):
            raise ValueError(f"upsampler {i} got input of shape {tuple(x.shape)}; its config "
                             f"takes [B, {cfg.low_res_size}, {cfg.low_res_size}, 3] "
                             f"({cfg.low_res_size} → {cfg.image_size})")
        s = cfg.image_size
        x = diffusion.sample(
            D.make_upsampler_denoiser(cfg), p,
            schedule=sched, rng=jax.random.fold_in(rng, i), shape=(x.shape[0], s, s, 3), cond={"low_res": x},
            method=method, eta=eta, model_output=cfg.model_output,
            variance="learned" if cfg.learned_variance else "fixed_small",
            clip_x0=(-1.0, 1.0))
    return x


# ============================================================================ the chain


def make_text_to_image(unclip: UnCLIP, settings: Settings | None = None):
    """The jitted pure chain ``fn(params, tokens [B, L] int32, rng, guidance) -> images
    [B, H, W, 3]`` float32 in [-1, 1] (H = :attr:`UnCLIP.resolution`).

    ``guidance = (prior_scale, decoder_scale)``, traced. The same configs and settings give the
    same jitted object (``fn._cache_size()`` counts its compiles, one per input shape).
    """
    return _text_to_image(unclip.configs, (settings or Settings()).resolved(unclip.configs))


@functools.lru_cache(maxsize=16)
def _text_to_image(configs: tuple, s: Settings):
    clip_cfg, prior_cfg, dec_cfg, ups = configs
    check_chain(clip_cfg, prior_cfg, dec_cfg, ups)
    p_schedule = prior_schedule(prior_cfg, s.prior_steps)
    dec_schedule = decoder_schedule(dec_cfg, s.decoder_steps)
    up_schedules = upsampler_schedules(ups, s.upsampler_steps)

    def text_to_image(params, tokens, rng, guidance):
        prior_scale, decoder_scale = guidance
        tokens = jnp.asarray(tokens, jnp.int32)
        r_prior, r_dec, r_up = jax.random.split(rng, 3)
        states, text_emb = encode_text(clip_cfg, params["clip"], tokens)
        emb = prior_embeddings(prior_cfg, params["prior"], text_emb, states, tokens, r_prior,
                               prior_scale, schedule=p_schedule, method=s.prior_method,
                               eta=s.prior_eta, num_candidates=s.num_candidates)
        x = decode(dec_cfg, params["decoder"], emb, r_dec, decoder_scale,
                   schedule=dec_schedule, method=s.decoder_method, eta=s.decoder_eta,
                   tokens=tokens if dec_cfg.use_text else None)
        return upsample_chain(ups, params["upsamplers"], x, r_up, schedules=up_schedules,
                              method=s.upsampler_method, eta=s.upsampler_eta)

    return jax.jit(text_to_image)


def check_prompts(captions: Sequence[str] | str) -> list[str]:
    """The prompt list, or ValueError for an empty list or blank prompts."""
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    if not captions:
        raise ValueError("no prompts given: pass a non-empty list of captions")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"prompt(s) at position {', '.join(map(str, bad))} are empty or only "
                         f"whitespace; every prompt needs some text")
    return captions


def generate(unclip: UnCLIP, captions: Sequence[str], seed: int = 0, *,
             prior_guidance: float | None = None, decoder_guidance: float | None = None,
             **settings) -> np.ndarray:
    """uint8 images ``[B, H, W, 3]`` for ``captions`` (tokenized on the host, then the jitted
    chain). ``settings``: the fields of :class:`Settings`; guidance defaults to the configs'."""
    captions = check_prompts(captions)
    if unclip.tokenizer is None:
        raise ValueError("this UnCLIP has no tokenizer; pass token ids to make_text_to_image")
    fn = make_text_to_image(unclip, settings_from(**settings))
    tokens = unclip.tokenizer.encode(captions, unclip.clip.context_length)
    guidance = (jnp.float32(unclip.prior.guidance_scale if prior_guidance is None
                            else prior_guidance),
                jnp.float32(unclip.decoder.guidance_scale if decoder_guidance is None
                            else decoder_guidance))
    return to_uint8(fn(unclip.params, tokens, jax.random.PRNGKey(seed), guidance))


# ============================================================================ judge scores


def score_prompts(unclip: UnCLIP, prompts: Sequence[str], seed: int = 0, *,
                  batch_size: int = 16, **settings) -> dict:
    """Generate one image per captioned-shapes prompt and read it back with the judge
    (:func:`unclip_jax.shapes.score_caption` at the output resolution).

    Returns fractions ``single_colour_shape`` (one-object prompts: colour and shape right),
    ``two_both_colour_shape`` (two-object prompts: both objects' colour and shape right),
    ``relation`` (two-object prompts: the relation right), ``exact``, and the counts
    ``num_single`` / ``num_two``; a fraction is None where no prompt of its kind was given.
    """
    from unclip_jax.eval.metrics import judge_scores

    prompts = check_prompts(prompts)
    images = np.concatenate([
        generate(unclip, prompts[i:i + batch_size], seed + i, **settings)
        for i in range(0, len(prompts), batch_size)])
    return judge_scores(images, prompts)


__all__ = ["Settings", "UnCLIP", "check_chain", "check_prompts", "decode", "decoder_conds",
           "decoder_schedule", "encode_text", "fit_tokens", "generate", "load_unclip",
           "make_text_to_image", "prior_embeddings", "prior_schedule", "score_prompts",
           "settings_from", "to_uint8", "upsample_chain", "upsampler_schedules"]
