"""Convert Kakao Brain's Karlo unCLIP (the diffusers layout) into our prior/decoder/upsamplers.

Input: a diffusers ``UnCLIPPipeline`` folder (``kakaobrain/karlo-v1-alpha``): ``prior/``
(``PriorTransformer``), ``text_proj/`` (``UnCLIPTextProjModel``), ``decoder/`` (the 64 px
``UNet2DConditionModel``), ``super_res_first/`` and ``super_res_last/`` (``UNet2DModel``), each
with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (``.bin`` read with
``weights_only=True``; ``.npz`` from ``np.savez`` needs neither torch nor safetensors). Output:
one workdir per stage (``prior``, ``decoder``, ``super_res_first``, ``super_res_last``), each a
``config.json`` plus ``checkpoints/0`` as a training run writes them, so
:func:`unclip_jax.train.runs.load_prior`, :func:`unclip_jax.train.runs.load_decoder` /
``load_upsampler``
read them.

Every tensor must land on exactly one of our params with the right shape; otherwise a
:class:`ConversionError` lists the missing, unknown and mis-shaped keys (never a partial load).
Configs are read from ``config.json`` and checked against the tensors.

Where Karlo differs from the paper (Ramesh et al. 2022), and how our models hold it:

* **Prior.** Same token layout as the paper (77 CLIP token states, text embedding, timestep,
  noised embedding, final query; learned positions on all 81), but the embeddings are *raw*
  CLIP ViT-L/14 outputs (not unit-norm) standardised by per-dimension ``clip_mean``/
  ``clip_std`` (→ ``normalization="standardize"``, ``renormalize=False``, ``text_emb_scale=1``);
  no learned null conditioning (guidance uses the CLIP encoding of the empty caption: the
  converted ``null_text_*`` params are zeros and callers pass that encoding as ``uncond``);
  x̂₀ is clipped to ±``clip_sample_range`` during sampling (not in the paper); no candidate
  reranking in the diffusers pipeline (our ``num_candidates`` is set to 1).
* **Decoder.** As in the paper, the image embedding is projected and added to the timestep
  embedding and projected into 4 extra context tokens; but instead of GLIDE's own text encoder
  Karlo reuses the *CLIP text tower*: its text embedding is projected and added to the timestep
  embedding too, and its 77 token states are projected to the context width and LayerNorm-ed
  (→ ``DecoderConfig.clip_text_width``). Embeddings enter raw (``clip_emb_scale=1``). The
  learned null image embedding replaces the image embedding for guidance; the null *text* is
  again the empty caption's CLIP encoding. ADM-style attention: each attention block attends
  over the spatial tokens plus the context's own key/value projections (``added_kv_proj``);
  no output gate (our zero-initialised gate is set to 1).
* **Super-resolution.** Karlo's 64→256 model is a U-Net without attention whose residual blocks
  add the timestep embedding (``time_shift="add"``), not ADM's scale-shift, and it replaces the
  paper's second 256→1024 stage by a separate network for the *last* step of the 64→256
  sampling ("improved SR": ``super_res_first`` for all but the last step, ``super_res_last``
  for it: ``UpsamplerConfig.last_step`` on the converted ``super_res_last``, so the pipeline
  folds it into the stage before it). Its low-res input is enlarged bicubically with
  antialiasing in diffusers (→ ``low_res_resize="cubic"``: ``jax.image.resize``'s cubic equals
  torch's antialiased bicubic when enlarging).
* **Sampling.** diffusers' ``UnCLIPScheduler`` is DDPM over ``round(k·(T−1)/(n−1))``
  timesteps (→ ``sample_method="ddpm"``, ``sample_spacing="unclip"``, :func:`karlo_schedule`)
  with 25 prior, 25 decoder and 7 super-resolution steps and guidance scales 4 (prior) and 8
  (decoder), the defaults written into the converted configs; guidance's unconditional input
  is the empty caption's CLIP encoding (→ ``PriorConfig.uncond="empty_caption"``), and both the
  prior and the decoder read the raw CLIP text embedding (``unit_text_emb=False``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.pipelines.convert.clip import (ConversionError, _set, normalize_state_dict,
                                            spec_leaves)
# Karlo's sampling schedule lives in the diffusion core (re-exported from its old home here).
from unclip_jax.core.diffusion.schedule import karlo_schedule, karlo_timesteps  # noqa: F401
from unclip_jax.models.decoder import DecoderConfig, UpsamplerConfig
from unclip_jax.models.prior import PriorConfig

COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.npz")
SUPER_RES_FACTOR = 4                     # Karlo's upsamplers: 64 → 256

Spec = dict  # nested {our name: (source key, fn) | nested}


# ----------------------------------------------------------------------------- tensor maps


def _lin(a: np.ndarray) -> np.ndarray:
    """torch Linear weight ``[out, in]`` → flax kernel ``[in, out]``."""
    return np.ascontiguousarray(np.asarray(a).T)


def _same(a: np.ndarray) -> np.ndarray:
    return np.asarray(a)


def _conv(a: np.ndarray) -> np.ndarray:
    """torch Conv2d weight ``[out, in, kh, kw]`` → flax ``[kh, kw, in, out]``."""
    return np.ascontiguousarray(np.asarray(a).transpose(2, 3, 1, 0))


def _squeeze(a: np.ndarray) -> np.ndarray:
    """``[1, …, D]`` parameters (positions, prd token) without their leading singleton axes."""
    a = np.asarray(a)
    while a.ndim > 1 and a.shape[0] == 1:
        a = a[0]
    return a


def _heads(head_dim: int) -> Callable:
    """q/k/v Linear ``[H·Dh, in]`` → ``[in, H, Dh]``."""
    def fn(a):
        a = np.asarray(a)
        return a.T.reshape(a.shape[1], a.shape[0] // head_dim, head_dim)
    return fn


def _heads_bias(head_dim: int) -> Callable:
    return lambda a: np.asarray(a).reshape(-1, head_dim)


def _heads_out(head_dim: int) -> Callable:
    """output Linear ``[D, H·Dh]`` → ``[H, Dh, D]``."""
    def fn(a):
        a = np.asarray(a)
        return a.T.reshape(a.shape[1] // head_dim, head_dim, a.shape[0])
    return fn


def _dense(key: str) -> Spec:
    return {"kernel": (f"{key}.weight", _lin), "bias": (f"{key}.bias", _same)}


def _norm(key: str) -> Spec:
    return {"scale": (f"{key}.weight", _same), "bias": (f"{key}.bias", _same)}


def _conv_spec(key: str) -> Spec:
    return {"kernel": (f"{key}.weight", _conv), "bias": (f"{key}.bias", _same)}


def _attention(prefix: str, head_dim: int, out: str = "to_out.0",
               context: bool = False) -> Spec:
    spec = {}
    names = [("query", "to_q"), ("key", "to_k"), ("value", "to_v")]
    if context:
        names += [("context_key", "add_k_proj"), ("context_value", "add_v_proj")]
    for ours, theirs in names:
        spec[ours] = {"kernel": (f"{prefix}.{theirs}.weight", _heads(head_dim)),
                      "bias": (f"{prefix}.{theirs}.bias", _heads_bias(head_dim))}
    spec["out"] = {"kernel": (f"{prefix}.{out}.weight", _heads_out(head_dim)),
                   "bias": (f"{prefix}.{out}.bias", _same)}
    return spec


# ----------------------------------------------------------------------------- checks


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConversionError(msg)


def _expect(config: Mapping, key: str, accepted: tuple, component: str, default=None) -> Any:
    value = config.get(key, default)
    if isinstance(value, list):
        value = tuple(value)
    _check(value in accepted, f"{component}/config.json: {key} = {value!r} is not supported; "
                              f"accepted: {', '.join(map(repr, accepted))}")
    return value


def _fill(spec: Spec, sd: Mapping[str, np.ndarray], want: dict[tuple, tuple], what: str,
          synth: Mapping[tuple, np.ndarray] = (), prefix: str = "",
          ignore: frozenset = frozenset()) -> dict:
    """Our params from ``sd`` by ``spec``; all-or-nothing (the error lists every problem).

    ``synth``: params with no source tensor, given directly (e.g. the attention gates = 1).
    ``prefix``: the keys of ``sd`` this spec must consume (others belong to another spec).
    """
    params: dict = {}
    used, missing, misshaped = set(), [], []
    for path, (key, fn) in spec_leaves(spec):
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        try:
            value = np.asarray(fn(sd[key]), np.float32)
        except ValueError as e:
            misshaped.append(f"{key} {tuple(np.shape(sd[key]))} -> {'/'.join(path)}: {e}")
            continue
        if tuple(value.shape) != want.get(path):
            misshaped.append(f"{key} {tuple(np.shape(sd[key]))} -> {'/'.join(path)} "
                             f"{tuple(value.shape)}, model wants {want.get(path)}")
            continue
        _set(params, path, value)
    for path, value in dict(synth).items():
        value = np.asarray(value, np.float32)
        if tuple(value.shape) != want.get(path):
            misshaped.append(f"(synthesised) -> {'/'.join(path)} {value.shape}, model wants "
                             f"{want.get(path)}")
        _set(params, path, value)
    unknown = sorted(k for k in set(sd) - used - ignore if k.startswith(prefix))
    covered = {p for p, _ in spec_leaves(spec)} | set(dict(synth))
    unfilled = sorted("/".join(p) for p in set(want) - covered)
    problems = []
    for title, items in (("missing keys", sorted(set(missing))), ("unknown keys", unknown),
                         ("mis-shaped keys", misshaped), ("params with no source", unfilled)):
        if items:
            problems.append(f"{title} ({len(items)}):\n" + "\n".join(f"  {k}" for k in items))
    if problems:
        raise ConversionError(f"the {what} state dict does not match our model:\n"
                              + "\n".join(problems))
    return params


def _shapes(init: Callable) -> dict[tuple, tuple]:
    import flax.linen as nn
    import jax

    abstract = jax.eval_shape(lambda: nn.meta.unbox(init(jax.random.key(0))["params"]))
    return {tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


# ----------------------------------------------------------------------------- prior


def prior_config(config: Mapping, sd: Mapping[str, np.ndarray], *,
                 clip_sample_range: float = 0.0, **overrides) -> PriorConfig:
    """Our :class:`PriorConfig` of a diffusers ``PriorTransformer`` (config + tensors)."""
    c = "prior"
    _expect(config, "added_emb_type", ("prd",), c, "prd")
    _expect(config, "encoder_hid_proj_type", ("linear",), c, "linear")
    _expect(config, "embedding_proj_norm_type", (None,), c, None)
    _expect(config, "norm_in_type", (None, "layer"), c, None)
    _expect(config, "time_embed_act_fn", ("silu",), c, "silu")
    _expect(config, "additional_embeddings", (4,), c, 4)
    heads, head_dim = int(config.get("num_attention_heads", 32)), int(
        config.get("attention_head_dim", 64))
    emb_dim = int(config.get("embedding_dim", 768))
    for key in ("clip_mean", "clip_std"):
        _check(key in sd, f"prior: {key!r} is missing (Karlo's embedding statistics)")
    mean, std = _squeeze(sd["clip_mean"]), _squeeze(sd["clip_std"])
    out_dim = int(config.get("clip_embed_dim") or emb_dim)
    _check(out_dim == emb_dim and config.get("embedding_proj_dim") in (None, emb_dim),
           f"prior: clip_embed_dim/embedding_proj_dim must equal embedding_dim {emb_dim} "
           f"(got {out_dim}, {config.get('embedding_proj_dim')})")
    _check(mean.shape == (emb_dim,) and std.shape == (emb_dim,),
           f"prior: clip_mean/clip_std have shapes {mean.shape}/{std.shape}; expected "
           f"({emb_dim},)")
    width = heads * head_dim
    kw = dict(embed_dim=emb_dim, text_width=emb_dim,
              context_length=int(config.get("num_embeddings", 77)), width=width,
              depth=int(config.get("num_layers", 20)), num_heads=heads, mlp_ratio=4.0,
              act="gelu", schedule="cosine", num_timesteps=1000, cond_drop_prob=0.1,
              normalization="standardize", embed_mean=tuple(float(v) for v in mean),
              embed_std=tuple(float(v) for v in std), renormalize=False, num_candidates=1,
              sample_steps=25, sample_method="ddpm", text_emb_scale=1.0,
              time_embed_dim=int(config.get("time_embed_dim") or width),
              norm_in=config.get("norm_in_type") == "layer",
              clip_sample_range=float(clip_sample_range), guidance_scale=4.0,
              uncond="empty_caption", unit_text_emb=False, sample_spacing="unclip")
    kw.update(overrides)
    return PriorConfig(**kw)


def prior_spec(cfg: PriorConfig) -> Spec:
    hd = cfg.width // cfg.num_heads
    spec: Spec = {
        "time_mlp_0": _dense("time_embedding.linear_1"),
        "time_mlp_1": _dense("time_embedding.linear_2"),
        "x_proj": _dense("proj_in"),
        "text_emb_proj": _dense("embedding_proj"),
        "text_states_proj": _dense("encoder_hidden_states_proj"),
        "positional_embedding": ("positional_embedding", _squeeze),
        "final_query": ("prd_embedding", _squeeze),
        "ln_final": _norm("norm_out"),
        "out": _dense("proj_to_clip_embeddings"),
        "transformer": {},
    }
    if cfg.norm_in:
        spec["ln_in"] = _norm("norm_in")
    for i in range(cfg.depth):
        p = f"transformer_blocks.{i}"
        spec["transformer"][f"block_{i}"] = {
            "ln_1": _norm(f"{p}.norm1"), "attn": _attention(f"{p}.attn1", hd),
            "ln_2": _norm(f"{p}.norm3"),
            "mlp": {"fc": _dense(f"{p}.ff.net.0.proj"), "proj": _dense(f"{p}.ff.net.2")}}
    return spec


def prior_shapes(cfg: PriorConfig) -> dict[tuple, tuple]:
    import jax.numpy as jnp

    from unclip_jax.models.prior import DiffusionPrior

    L = cfg.context_length
    cond = {"text_emb": jnp.zeros((1, cfg.embed_dim)),
            "text_states": jnp.zeros((1, L, cfg.text_width)),
            "text_mask": jnp.ones((1, L), bool)}
    return _shapes(lambda key: DiffusionPrior(cfg).init(
        key, jnp.zeros((1, cfg.embed_dim)), jnp.zeros((1,), jnp.int32), cond))


def convert_prior(config: Mapping, sd: Mapping[str, Any], **options) -> tuple[PriorConfig, dict]:
    """``(PriorConfig, params)`` of a diffusers ``PriorTransformer``. The learned nulls (which
    Karlo does not have) are zeros; ``clip_mean``/``clip_std`` go to the config."""
    sd = normalize_state_dict(sd)
    cfg = prior_config(config, sd, **options)
    want = prior_shapes(cfg)
    synth = {("null_text_emb",): np.zeros(want[("null_text_emb",)], np.float32),
             ("null_text_states",): np.zeros(want[("null_text_states",)], np.float32)}
    params = _fill(prior_spec(cfg), sd, want, "prior", synth,
                   ignore=frozenset({"clip_mean", "clip_std"}))
    return cfg, params


# ----------------------------------------------------------------------------- U-Nets


def _resnet(prefix: str, has_skip: bool) -> Spec:
    spec = {"norm_1": _norm(f"{prefix}.norm1"), "conv_1": _conv_spec(f"{prefix}.conv1"),
            "emb_proj": _dense(f"{prefix}.time_emb_proj"), "norm_2": _norm(f"{prefix}.norm2"),
            "conv_2": _conv_spec(f"{prefix}.conv2")}
    if has_skip:
        spec["skip"] = _conv_spec(f"{prefix}.conv_shortcut")
    return spec


def unet_spec(sd: Mapping, levels: int, num_res: int, attn_levels: set[int],
              head_dim: int, mid_attention: bool) -> tuple[Spec, dict]:
    """Our ``UNet`` params from a diffusers U-Net with ResnetDown/UpsampleBlock2D-style
    resampling; returns ``(spec, synthesised gates)``."""
    spec: Spec = {"time_fc1": _dense("time_embedding.linear_1"),
                  "time_fc2": _dense("time_embedding.linear_2"),
                  "conv_in": _conv_spec("conv_in"), "norm_out": _norm("conv_norm_out"),
                  "conv_out": _conv_spec("conv_out")}
    gates: list[str] = []

    def res(ours, theirs):
        spec[ours] = _resnet(theirs, f"{theirs}.conv_shortcut.weight" in sd)

    def attn(ours, theirs):
        spec[ours] = {"norm": _norm(f"{theirs}.group_norm"),
                      "attn": _attention(theirs, head_dim, context=True)}
        gates.append(ours)

    for lv in range(levels):
        for i in range(num_res):
            res(f"down_{lv}_res_{i}", f"down_blocks.{lv}.resnets.{i}")
            if lv in attn_levels:
                attn(f"down_{lv}_attn_{i}", f"down_blocks.{lv}.attentions.{i}")
        if lv != levels - 1:
            res(f"down_{lv}_resample", f"down_blocks.{lv}.downsamplers.0")
    res("mid_res_0", "mid_block.resnets.0")
    if mid_attention:
        attn("mid_attn", "mid_block.attentions.0")
    res("mid_res_1", "mid_block.resnets.1")
    for j in range(levels):
        lv = levels - 1 - j
        for i in range(num_res + 1):
            res(f"up_{lv}_res_{i}", f"up_blocks.{j}.resnets.{i}")
            if lv in attn_levels:
                attn(f"up_{lv}_attn_{i}", f"up_blocks.{j}.attentions.{i}")
        if lv != 0:
            res(f"up_{lv}_resample", f"up_blocks.{j}.upsamplers.0")
    return spec, gates


def _unet_common(config: Mapping, component: str, down_ok: tuple, up_ok: tuple):
    """Checks shared by both U-Net kinds; ``(base, channel_mult, num_res, attention levels)``."""
    c = component
    _expect(config, "act_fn", ("silu",), c, "silu")
    _expect(config, "flip_sin_to_cos", (True,), c, True)
    _expect(config, "freq_shift", (0,), c, 0)
    _expect(config, "norm_eps", (1e-5,), c, 1e-5)
    _expect(config, "time_embedding_type", ("positional",), c, "positional")
    _expect(config, "center_input_sample", (False,), c, False)
    _expect(config, "upsample_type", ("conv",), c, "conv")
    _expect(config, "downsample_type", ("conv",), c, "conv")
    blocks = tuple(int(b) for b in config.get("block_out_channels", ()))
    _check(len(blocks) >= 1, f"{c}/config.json: block_out_channels is missing")
    base = blocks[0]
    _check(all(b % base == 0 for b in blocks),
           f"{c}: block_out_channels {blocks} must be multiples of the first ({base})")
    down = tuple(config.get("down_block_types", ()))
    up = tuple(config.get("up_block_types", ()))
    _check(len(down) == len(blocks) == len(up),
           f"{c}: {len(down)} down blocks, {len(up)} up blocks, {len(blocks)} widths")
    for t in down:
        _check(t in down_ok, f"{c}: down block {t!r} is not supported; accepted: "
                             f"{', '.join(down_ok)}")
    for t in up:
        _check(t in up_ok, f"{c}: up block {t!r} is not supported; accepted: "
                           f"{', '.join(up_ok)}")
    attn = {i for i, t in enumerate(down) if "Attn" in t}
    up_attn = {len(up) - 1 - j for j, t in enumerate(up) if "Attn" in t}
    _check(attn == up_attn, f"{c}: attention levels differ between the down ({sorted(attn)}) "
                            f"and up ({sorted(up_attn)}) paths")
    num_res = int(config.get("layers_per_block", 2))
    return base, tuple(b // base for b in blocks), num_res, attn


def decoder_config(decoder: Mapping, text_proj: Mapping, *, context_length: int = 77,
                   **overrides) -> DecoderConfig:
    """Our :class:`DecoderConfig` of Karlo's decoder ``UNet2DConditionModel`` + text_proj."""
    c = "decoder"
    base, mult, num_res, attn = _unet_common(
        decoder, c, ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"))
    _expect(decoder, "mid_block_type", ("UNetMidBlock2DSimpleCrossAttn",), c)
    _expect(decoder, "class_embed_type", ("identity",), c)
    _expect(decoder, "resnet_time_scale_shift", ("scale_shift",), c)
    _expect(decoder, "encoder_hid_dim", (None,), c, None)
    _expect(decoder, "addition_embed_type", (None,), c, None)
    _expect(decoder, "in_channels", (3,), c)
    out = _expect(decoder, "out_channels", (3, 6), c)
    _expect(decoder, "only_cross_attention", (False,), c, False)
    _expect(decoder, "cross_attention_norm", (None,), c, None)
    size = int(decoder.get("sample_size", 64))
    head_dim = decoder.get("attention_head_dim", 8)
    _check(isinstance(head_dim, int), f"{c}: attention_head_dim {head_dim!r} must be one int")
    ctx = int(decoder.get("cross_attention_dim", 1280))
    _check(int(text_proj.get("cross_attention_dim", ctx)) == ctx and int(
        text_proj.get("time_embed_dim", 4 * base)) == 4 * base,
           f"text_proj (cross_attention_dim {text_proj.get('cross_attention_dim')}, "
           f"time_embed_dim {text_proj.get('time_embed_dim')}) does not fit the decoder "
           f"(cross_attention_dim {ctx}, time embedding {4 * base})")
    clip_dim = int(text_proj.get("clip_embeddings_dim", 768))
    kw = dict(image_size=size, clip_dim=clip_dim, base_channels=base, channel_mult=mult,
              num_res_blocks=num_res,
              attention_resolutions=tuple(size // 2 ** lv for lv in sorted(attn)),
              head_channels=head_dim, resblock_updown=True,
              num_clip_tokens=int(text_proj.get("clip_extra_context_tokens", 4)),
              context_dim=ctx, text_layers=0, context_length=context_length,
              clip_emb_scale=1.0, clip_text_width=clip_dim,
              groups=int(decoder.get("norm_num_groups", 32)), schedule="cosine",
              num_timesteps=1000, model_output="eps", learned_variance=out == 6,
              sample_steps=25, guidance_scale=8.0, sample_method="ddpm",
              sample_spacing="unclip")
    kw.update(overrides)
    return DecoderConfig(**kw)


def decoder_spec(cfg: DecoderConfig, sd: Mapping) -> tuple[Spec, dict]:
    ds = {cfg.image_size // r for r in cfg.attention_resolutions}
    levels = len(cfg.channel_mult)
    attn_levels = {lv for lv in range(levels) if 2 ** lv in ds}
    unet, gates = unet_spec({k[len("decoder."):]: v for k, v in sd.items()
                             if k.startswith("decoder.")}, levels, cfg.num_res_blocks,
                             attn_levels, cfg.head_channels, True)
    unet = _prefixed(unet, "decoder.")
    n, width = cfg.num_clip_tokens, cfg.context_dim

    def tokens_w(a):  # [C·n, E], row d·n + k  → kernel [E, n·C], column k·C + d
        a = np.asarray(a)
        return a.reshape(width, n, -1).transpose(1, 0, 2).reshape(n * width, -1).T

    def tokens_b(a):
        return np.asarray(a).reshape(width, n).T.reshape(-1)

    t = "text_proj."
    spec = {"unet": unet,
            "clip_to_emb": _dense(f"{t}clip_image_embeddings_project_to_time_embeddings"),
            "text_emb_to_emb": _dense(f"{t}embedding_proj"),
            "clip_to_tokens": {"kernel": (f"{t}clip_extra_context_tokens_proj.weight", tokens_w),
                               "bias": (f"{t}clip_extra_context_tokens_proj.bias", tokens_b)},
            "text_states_proj": _dense(f"{t}encoder_hidden_states_proj"),
            "text_states_ln": _norm(f"{t}text_encoder_hidden_states_norm"),
            "null_image_emb": (f"{t}learned_classifier_free_guidance_embeddings", _same)}
    return spec, {("unet", g, "gate"): None for g in gates}


def _prefixed(spec: Spec, prefix: str) -> Spec:
    return {k: _prefixed(v, prefix) if isinstance(v, dict) else (prefix + v[0], v[1])
            for k, v in spec.items()}


def decoder_shapes(cfg: DecoderConfig) -> dict[tuple, tuple]:
    from unclip_jax.models.decoder import init_decoder

    return _shapes(lambda key: init_decoder(cfg, key))


def convert_decoder(decoder_cfg: Mapping, decoder_sd: Mapping[str, Any], text_proj_cfg: Mapping,
                    text_proj_sd: Mapping[str, Any], **options) -> tuple[DecoderConfig, dict]:
    """``(DecoderConfig, params)`` of Karlo's decoder U-Net and its ``UnCLIPTextProjModel``."""
    sd = {f"decoder.{k}": v for k, v in normalize_state_dict(decoder_sd).items()}
    sd.update({f"text_proj.{k}": v for k, v in normalize_state_dict(text_proj_sd).items()})
    cfg = decoder_config(decoder_cfg, text_proj_cfg, **options)
    want = decoder_shapes(cfg)
    spec, gates = decoder_spec(cfg, sd)
    synth = {p: np.ones(want.get(p, (0,)), np.float32) for p in gates}
    return cfg, _fill(spec, sd, want, "decoder + text_proj", synth)


def upsampler_config(config: Mapping, *, factor: int = SUPER_RES_FACTOR,
                     image_size: int | None = None, **overrides) -> UpsamplerConfig:
    """Our :class:`UpsamplerConfig` of a Karlo super-resolution ``UNet2DModel``."""
    c = "super_res"
    base, mult, num_res, attn = _unet_common(config, c, ("ResnetDownsampleBlock2D",),
                                             ("ResnetUpsampleBlock2D",))
    _expect(config, "add_attention", (False,), c, True)
    _expect(config, "in_channels", (6,), c)
    out = _expect(config, "out_channels", (3, 6), c)
    _expect(config, "class_embed_type", (None,), c, None)
    shift = _expect(config, "resnet_time_scale_shift", ("default", "scale_shift"), c, "default")
    size = int(image_size or config.get("sample_size") or 256)
    kw = dict(image_size=size, low_res_size=size // factor, base_channels=base,
              channel_mult=mult, num_res_blocks=num_res, resblock_updown=True,
              groups=int(config.get("norm_num_groups", 32)),
              time_shift="add" if shift == "default" else "scale_shift", augment="none",
              schedule="cosine", num_timesteps=1000, model_output="eps",
              learned_variance=out == 6, sample_steps=7, sample_method="ddpm",
              sample_spacing="unclip", low_res_resize="cubic")
    kw.update(overrides)
    return UpsamplerConfig(**kw)


def upsampler_shapes(cfg: UpsamplerConfig) -> dict[tuple, tuple]:
    from unclip_jax.models.decoder import init_upsampler

    return _shapes(lambda key: init_upsampler(cfg, key))


def convert_upsampler(config: Mapping, sd: Mapping[str, Any],
                      **options) -> tuple[UpsamplerConfig, dict]:
    """``(UpsamplerConfig, params)`` of a Karlo super-resolution ``UNet2DModel``."""
    sd = normalize_state_dict(sd)
    cfg = upsampler_config(config, **options)
    spec, gates = unet_spec(sd, len(cfg.channel_mult), cfg.num_res_blocks, set(), 0, False)
    assert not gates
    return cfg, _fill({"unet": spec}, sd, upsampler_shapes(cfg), "super-resolution U-Net")


# ----------------------------------------------------------------------------- pipeline folder


def read_component(source: str | os.PathLike, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, state dict)`` of ``<source>/<name>``."""
    folder = Path(source) / name
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} does not exist: {str(source)!r} is not a "
                                f"diffusers Karlo pipeline folder (expected "
                                f"{', '.join(COMPONENTS)}, each with config.json)")
    from unclip_jax.pipelines.convert import read_state_dict

    for f in WEIGHT_FILES:
        if (folder / f).is_file():
            return json.loads(cfg_path.read_text()), read_state_dict(folder / f)
    raise FileNotFoundError(f"no weights in {str(folder)!r}; expected one of "
                            f"{', '.join(WEIGHT_FILES)}")


def _scheduler_clip_range(source: Path, name: str, default: float) -> float:
    path = source / name / "scheduler_config.json"
    if not path.is_file():
        return default
    cfg = json.loads(path.read_text())
    return float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else 0.0


def convert_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike,
                       **options) -> Path:
    """Convert a diffusers Karlo pipeline folder into our workdirs under ``out_dir``:
    ``prior/``, ``decoder/``, ``super_res_first/``, ``super_res_last/`` (returns ``out_dir``).

    ``options``: ``prior_clip_sample_range`` (default: ``prior_scheduler/scheduler_config.json``
    when present, else 10), ``context_length`` (77), ``components`` (a subset of
    ``("prior", "decoder", "super_res_first", "super_res_last")``).
    """
    from unclip_jax.pipelines.convert import save_workdir

    source, out = Path(source), Path(out_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"{str(source)!r} is not a folder; pass a diffusers Karlo "
                                f"pipeline folder (with {', '.join(COMPONENTS)})")
    known = {"prior_clip_sample_range", "context_length", "components"}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"unknown option(s) {', '.join(bad)}; accepted: {', '.join(sorted(known))}")
    stages = options.get("components", ("prior", "decoder", "super_res_first",
                                         "super_res_last"))
    if isinstance(stages, str):  # from the CLI: "prior,decoder"
        stages = [c.strip() for c in stages.split(",") if c.strip()]
    stages = tuple(stages)
    for s in stages:
        if s not in ("prior", "decoder", "super_res_first", "super_res_last"):
            raise ValueError(f"unknown component {s!r}; accepted: prior, decoder, "
                             f"super_res_first, super_res_last")
    ctx = int(options.get("context_length", 77))
    done = []
    if "prior" in stages:
        rng = options.get("prior_clip_sample_range")
        rng = _scheduler_clip_range(source, "prior_scheduler", 10.0) if rng is None else rng
        pcfg, psd = read_component(source, "prior")
        cfg, params = convert_prior(pcfg, psd, clip_sample_range=rng)
        done.append((cfg, params, "prior"))
    if "decoder" in stages:
        dcfg, dsd = read_component(source, "decoder")
        tcfg, tsd = read_component(source, "text_proj")
        cfg, params = convert_decoder(dcfg, dsd, tcfg, tsd, context_length=ctx)
        done.append((cfg, params, "decoder"))
    for name in ("super_res_first", "super_res_last"):
        if name in stages:
            ucfg, usd = read_component(source, name)
            cfg, params = convert_upsampler(ucfg, usd, last_step=name == "super_res_last")
            done.append((cfg, params, name))
    # Write only once everything converted (no half-converted output folder).
    for cfg, params, name in done:
        save_workdir(cfg, params, out / name, source=str(source / name))
    return out
