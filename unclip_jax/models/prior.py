"""unCLIP's diffusion prior: a caption's CLIP text features → a CLIP image embedding.

A decoder-only causal transformer reads, in order (``L + 4`` positions)::

    [ text token states ×L | text embedding | timestep | noised image embedding | final query ]

(the CLIP text tower's final-LN token states and its embedding, each linearly projected to
the model width; a sinusoidal-then-MLP timestep embedding; the noised embedding x_t
projected; a learned query). The output at the final query is projected to ``E`` and predicts
the **un-noised** embedding x₀ (MSE, ``model_output="x0"`` in :mod:`unclip_jax.core.diffusion`).
Padding text tokens are masked out as keys. Cosine schedule, 1000 steps; sampling runs the
shared sampler on a 64-step respacing.

Classifier-free guidance: in training the text conditioning — token states *and* text
embedding, one draw per example — is replaced with probability ``cond_drop_prob`` (10%) by
learned null embeddings (``null_text_states`` ``[L, W]``, ``null_text_emb`` ``[E]``, all
null tokens visible). Only the conditioning is replaced: the noised-embedding token and the
timestep go in unchanged, in training (:func:`unclip_jax.core.diffusion.training_loss`) and in
the sampler's ``[cond; uncond]`` batch alike.

Embedding scale ("Known traps": unit-norm embeddings are badly scaled for diffusion). The
diffusion runs on ``x = s · e`` with ``e`` the unit-norm CLIP image embedding and
``s = embed_scale``; the paper uses s = 17.2 for E = 1024, i.e. ≈ 0.54·√E, which gives each
coordinate a standard deviation of ≈ 0.54 — so ``embed_scale = 0`` means ``0.54·√E``
(4.32 for our E = 64). ``normalization="standardize"`` instead uses ``(e − μ)/σ`` per dimension
with μ, σ measured on the training cache (stored in the config as ``embed_mean``/``embed_std``).
Samples are mapped back (÷ s, or ·σ + μ) and, with ``renormalize``, put back on the unit sphere.

Options for imported weights (Karlo, :mod:`unclip_jax.pipelines.convert.karlo`): ``text_emb_scale``
(0 = √E, our unit-norm convention; Karlo feeds raw CLIP text embeddings: 1), ``time_embed_dim``
(hidden width of the timestep MLP, 0 = width), ``norm_in`` (a LayerNorm on the sequence before
the transformer) and ``clip_sample_range`` (clip every predicted x₀ to ±range while sampling;
0 = no clipping). Sampling options the text → image pipeline (:mod:`unclip_jax.pipelines.unclip`)
honours: ``uncond`` (the guidance's unconditional input: the learned nulls, or — Karlo, which
has none — the CLIP encoding of the empty caption), ``unit_text_emb`` (False: the raw projected
CLIP text feature goes in, as Karlo was trained) and ``sample_spacing`` ("even": our
:func:`~unclip_jax.core.diffusion.respace`; "unclip": diffusers' ``UnCLIPScheduler`` timesteps).

At sampling ``num_candidates = k`` embeddings are drawn per caption and the one with the
highest dot product with the caption's text embedding is kept (paper: k = 2).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.core import diffusion
from unclip_jax.core.nn.attention import padding_mask
from unclip_jax.core.nn.layers import dtype as to_dtype
from unclip_jax.core.nn.layers import layer_norm
from unclip_jax.core.nn.transformer import Transformer

NORMALIZATIONS = ("scale", "standardize")
PAPER_SCALE_PER_SQRT_DIM = 0.54      # 17.2 / √1024 (unCLIP's scale for 1024-d embeddings)
BATCH_KEYS = ("image_emb", "text_emb", "text_states", "text_tokens")


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """The diffusion prior. ``embed_dim``/``text_width``/``context_length``/``pad_id`` follow the
    CLIP (filled in from the embedding cache by the prior task, ``train/tasks/prior.py``)."""

    embed_dim: int = 64                  # E, CLIP joint embedding
    text_width: int = 64                 # W, CLIP text tower width (token states)
    context_length: int = 24             # L, text tokens
    pad_id: int = 0                      # text padding token (masked out as keys)
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    num_timesteps: int = 1000
    schedule: str = "cosine"
    cond_drop_prob: float = 0.1          # text tokens + text embedding replaced by nulls
    normalization: str = "scale"         # "scale" | "standardize"
    embed_scale: float = 0.0             # 0 = 0.54·√E (the paper's 17.2 at E = 1024)
    embed_mean: tuple[float, ...] = ()   # standardize: per-dim μ, σ of the training cache
    embed_std: tuple[float, ...] = ()
    sample_steps: int = 64               # respaced sampling steps
    sample_method: str = "ddim"          # "ddim" | "ddpm" | "dpmpp_2m"
    eta: float = 0.0
    guidance_scale: float = 1.0
    num_candidates: int = 2
    renormalize: bool = True             # put samples back on the unit sphere
    text_emb_scale: float = 0.0          # 0 = √E (unit-norm text embeddings); Karlo: 1
    time_embed_dim: int = 0              # hidden width of the timestep MLP (0 = width)
    norm_in: bool = False                # LayerNorm on the sequence before the transformer
    clip_sample_range: float = 0.0       # sampling: clip x̂₀ to ±range (0 = no clipping)
    uncond: str = "learned"              # guidance uncond: "learned" nulls | "empty_caption"
    unit_text_emb: bool = True           # text_emb unit-norm (ours) or raw (Karlo: False)
    sample_spacing: str = "even"         # "even" (respace) | "unclip" (diffusers UnCLIPScheduler)
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    clip_workdir: str = ""               # the frozen CLIP (to build the cache when missing)
    embeddings_dir: str = ""             # embedding cache ("" = <workdir>/embeddings)

    RENAMED = {"cache_dir": "embeddings_dir"}     # old spelling, read with a deprecation


# ----------------------------------------------------------------------------- embedding space


def resolved_scale(cfg: PriorConfig) -> float:
    """The multiplier applied to unit-norm embeddings (``normalization="scale"``)."""
    return cfg.embed_scale if cfg.embed_scale > 0 else PAPER_SCALE_PER_SQRT_DIM * math.sqrt(
        cfg.embed_dim)


def _stats(cfg: PriorConfig):
    if len(cfg.embed_mean) != cfg.embed_dim or len(cfg.embed_std) != cfg.embed_dim:
        raise ValueError(f"normalization='standardize' needs embed_mean and embed_std of "
                         f"length embed_dim={cfg.embed_dim} (got {len(cfg.embed_mean)} and "
                         f"{len(cfg.embed_std)}); the prior task computes them from the cache")
    return jnp.asarray(cfg.embed_mean, jnp.float32), jnp.asarray(cfg.embed_std, jnp.float32)


def to_model_space(cfg: PriorConfig, emb):
    """Unit-norm CLIP embeddings ``[B, E]`` → the space the diffusion runs in."""
    emb = jnp.asarray(emb, jnp.float32)
    if cfg.normalization == "scale":
        return emb * resolved_scale(cfg)
    if cfg.normalization == "standardize":
        mean, std = _stats(cfg)
        return (emb - mean) / std
    raise ValueError(f"unknown normalization {cfg.normalization!r}; accepted: "
                     f"{', '.join(NORMALIZATIONS)}")


def from_model_space(cfg: PriorConfig, x, renormalize: bool = False):
    """Inverse of :func:`to_model_space`; ``renormalize`` projects onto the unit sphere."""
    x = jnp.asarray(x, jnp.float32)
    if cfg.normalization == "scale":
        emb = x / resolved_scale(cfg)
    elif cfg.normalization == "standardize":
        mean, std = _stats(cfg)
        emb = x * std + mean
    else:
        raise ValueError(f"unknown normalization {cfg.normalization!r}; accepted: "
                         f"{', '.join(NORMALIZATIONS)}")
    if renormalize:
        emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True).clip(1e-12)
    return emb


# ----------------------------------------------------------------------------- the model


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """Sinusoidal features ``[B, dim]`` (cos half, then sin half) of integer timesteps ``[B]``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


def _dense(features: int, names: tuple, name: str, dt) -> nn.Dense:
    return nn.Dense(features, dtype=dt, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                             names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


class DiffusionPrior(nn.Module):
    """``(x_t [B, E], t [B] int, cond) -> x̂₀ [B, E]`` float32 (model space).

    ``cond`` (see :func:`condition`): ``text_emb`` ``[B, E]`` (unit norm), ``text_states``
    ``[B, L, W]``, ``text_mask`` ``[B, L]`` bool (True = real token). With
    ``return_sequence`` the final-LN states of all ``L + 4`` positions ``[B, L + 4, D]`` are
    returned instead (for tests of causality).
    """

    config: PriorConfig

    @nn.compact
    def __call__(self, x_t, t, cond, return_sequence: bool = False):
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        E, D = cfg.embed_dim, cfg.width
        L = cond["text_states"].shape[1]
        if L > cfg.context_length:
            raise ValueError(f"{L} text tokens exceed context_length {cfg.context_length}")
        # The learned nulls live here so they train through losses.drop_condition.
        self.param("null_text_emb", nn.with_logical_partitioning(
            nn.initializers.normal(E ** -0.5), ("norm",)), (E,))
        self.param("null_text_states", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("length", "norm")), (cfg.context_length,
                                                               cfg.text_width))
        b = x_t.shape[0]
        act = ("batch", "length", "act_embed")
        text = _dense(D, (None, "embed"), "text_states_proj", dt)(
            cond["text_states"].astype(dt))
        # Unit-norm text embedding × √E: coordinates of unit variance for the projection.
        scale = cfg.text_emb_scale if cfg.text_emb_scale > 0 else math.sqrt(E)
        temb = _dense(D, (None, "embed"), "text_emb_proj", dt)(
            (cond["text_emb"].astype(jnp.float32) * scale).astype(dt))
        time = timestep_embedding(t, D).astype(dt)
        time = _dense(cfg.time_embed_dim or D, (None, "embed"), "time_mlp_0", dt)(time)
        time = _dense(D, ("embed", None), "time_mlp_1", dt)(nn.silu(time))
        xtok = _dense(D, (None, "embed"), "x_proj", dt)(x_t.astype(dt))
        query = self.param("final_query", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (D,))
        seq = jnp.concatenate(
            [text, temb[:, None], time[:, None], xtok[:, None],
             jnp.broadcast_to(query.astype(dt), (b, 1, D))], axis=1)
        pos = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), ("length", "embed")), (cfg.context_length + 4, D))
        seq = jnp.concatenate([seq[:, :L] + pos[:L].astype(dt),
                               seq[:, L:] + pos[cfg.context_length:].astype(dt)], axis=1)
        if cfg.norm_in:
            seq = layer_norm(name="ln_in")(seq).astype(dt)
        seq = nn.with_logical_constraint(seq, act)
        valid = jnp.concatenate([cond["text_mask"].astype(jnp.bool_),
                                 jnp.ones((b, 4), jnp.bool_)], axis=1)
        h = Transformer(D, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.act, causal=True,
                        dtype=dt, scan_layers=cfg.scan_layers, remat=cfg.remat,
                        name="transformer")(seq, padding_mask(valid))
        h = layer_norm(name="ln_final")(h)
        if return_sequence:
            return h
        return _dense(E, ("embed", None), "out", jnp.float32)(h[:, -1]).astype(jnp.float32)


def condition(cfg: PriorConfig, inputs: dict) -> dict:
    """The model's conditioning from ``text_emb [B, E]``, ``text_states [B, L, W]`` and
    ``text_tokens [B, L]`` (pad positions → ``text_mask`` False)."""
    return {"text_emb": jnp.asarray(inputs["text_emb"], jnp.float32),
            "text_states": jnp.asarray(inputs["text_states"], jnp.float32),
            "text_mask": jnp.asarray(inputs["text_tokens"]) != cfg.pad_id}


def null_condition(params, cfg: PriorConfig, length: int | None = None) -> dict:
    """The learned null conditioning (unbatched leaves, broadcast by the caller)."""
    length = cfg.context_length if length is None else length
    return {"text_emb": params["null_text_emb"],
            "text_states": params["null_text_states"][:length],
            "text_mask": jnp.ones((length,), jnp.bool_)}


def uncondition(params, cfg: PriorConfig, cond: dict) -> dict:
    """The null conditioning broadcast to ``cond``'s batch (the guidance's uncond branch)."""
    null = null_condition(params, cfg, cond["text_states"].shape[1])
    return jax.tree.map(lambda n, c: jnp.broadcast_to(n, c.shape).astype(c.dtype), null, cond)


def clip_range(cfg: PriorConfig) -> tuple[float, float] | None:
    """The sampler's x̂₀ clipping interval (None when ``clip_sample_range`` is 0)."""
    r = float(cfg.clip_sample_range)
    return (-r, r) if r > 0 else None


def make_denoiser(model: DiffusionPrior):
    """The shared-diffusion denoiser ``(params, x_t, t, cond) -> x̂₀``."""
    def denoiser(params, x_t, t, cond):
        return model.apply({"params": params}, x_t, t, cond)
    return denoiser


def base_schedule(cfg: PriorConfig) -> diffusion.Schedule:
    return diffusion.make_schedule(cfg.schedule, cfg.num_timesteps)


def loss_fn(model: DiffusionPrior, params, batch: dict, rng, *, schedule=None, denoiser=None):
    """x₀-MSE diffusion loss of a batch (``image_emb``, ``text_emb``, ``text_states``,
    ``text_tokens``) through :func:`unclip_jax.core.diffusion.training_loss`."""
    cfg = model.config
    schedule = base_schedule(cfg) if schedule is None else schedule
    return diffusion.training_loss(
        params, to_model_space(cfg, batch["image_emb"]), condition(cfg, batch), rng,
        denoiser=make_denoiser(model) if denoiser is None else denoiser, schedule=schedule,
        model_output="x0", cond_drop_prob=cfg.cond_drop_prob,
        null_cond=lambda p: null_condition(p, cfg, batch["text_states"].shape[1]))


# ----------------------------------------------------------------------------- sampling


def repeat_candidates(tree, k: int):
    """Every leaf ``[B, …]`` → ``[k·B, …]``, candidate-major (rows j·B … (j+1)·B − 1 are the
    j-th draw of each caption): the layout :func:`rerank` reads back."""
    return jax.tree.map(lambda x: jnp.concatenate([x] * k, axis=0), tree)


def rerank(candidates, text_emb):
    """``[k, B, E]`` candidates → ``[B, E]``: per caption the one with the highest dot product
    with ``text_emb`` ``[B, E]``."""
    scores = jnp.einsum("kbe,be->kb", candidates, jnp.asarray(text_emb, jnp.float32))
    best = jnp.argmax(scores, axis=0)
    return jnp.take_along_axis(candidates, best[None, :, None], axis=0)[0]


# ----------------------------------------------------------------------------- training task


