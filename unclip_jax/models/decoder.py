"""unCLIP's decoder (a GLIDE/ADM U-Net conditioned on CLIP image embeddings) and the diffusion
upsamplers. Both sample through the shared :mod:`unclip_jax.core.diffusion` sampler.

Decoder conditioning (Ramesh et al. 2022, §2.1), ``cond`` of the denoiser::

    {"image_emb": [B, E] unit-norm CLIP image embeddings,
     "text": {"states": [B, L, W] caption-encoder outputs, "valid": [B, L] bool}}   (optional)

* the embedding (×√E, so its entries are ~unit variance) is projected and **added to the
  timestep embedding**, and projected into ``num_clip_tokens`` (4) **context tokens**
  concatenated before the caption-encoder states; every attention block attends to them
  (``clip_mlp`` > 0, not in the paper: a residual MLP, Dense → SiLU → zero-initialised Dense,
  reads the embedding first, so that both projections see features that are not linear in it);
* the caption pathway (``text_layers > 0``, GLIDE's): a transformer over the caption tokens
  whose final-LN states join the context tokens; with ``text_class_emb`` its state at the last
  caption token (EOS) is also projected and added to the timestep embedding, GLIDE's "final
  token embedding … in place of a class embedding", so the caption reaches every residual
  block and not only the attention layers;
* classifier-free guidance: during training the embedding is replaced by a learned null
  embedding with probability ``clip_drop_prob`` (10%) and, independently, the caption states by
  learned null states with probability ``text_drop_prob`` (50%) — only the conditioning is
  replaced, never ``x_t``. At sampling the same nulls are the ``uncond``.

Self-conditioning (``self_condition`` = p > 0, Chen et al. 2022 "Analog Bits"; not in the
paper): ``cond["self_cond"]``, an x₀ estimate ``[B, S, S, 3]``, is concatenated to ``x_t`` on
channels (zeros when absent). Training gives it the decoder's own stop-gradient estimate on a
fraction p of the batches; the shared sampler gives each step the previous step's x₀.

CLIP-text conditioning (``clip_text_width > 0``, Karlo's decoder; see
:mod:`unclip_jax.pipelines.convert.karlo`): ``cond["clip_text"] = {"emb": [B, E] CLIP text
embedding,
"states": [B, L, W] CLIP text-tower token states, "valid": [B, L] bool}``. The text embedding is
projected and added to the timestep embedding next to the image embedding's projection, and
the token states are projected to the context width, LayerNorm-ed and concatenated after the
CLIP tokens. ``clip_emb_scale`` (0 = √E, our unit-norm convention; Karlo: 1, raw embeddings)
multiplies the image embedding before its projections.

Upsamplers (§2.1, appendix C): the low-resolution image, resized bilinearly to the target size
(``low_res_resize``; Karlo: "cubic", which equals torch's antialiased bicubic when enlarging),
is concatenated to ``x_t`` on channels; no attention anywhere (fully convolutional); trained on
random crops and run on whole images; conditioning augmentation "blur" (Gaussian blur of random
σ, the first stage) or "bsr" (a jittable BSR-style chain: blur → random down/up resize →
Gaussian noise → JPEG-like 8×8 DCT quantisation, the second stage). Sampled with few DDIM steps
(the paper: 27 for 64→256, 15 for 256→1024).

Training crops: the paper trains "on random crops of images that are one-fourth the target
size". We read it as a quarter of the *side* (64×64 crops of 256 px targets, i.e. 16×16
low-res crops) — the reading under which the 4× upsampler's training cost matches a 64 px
model — and expose it as ``crop_fraction`` (side ratio, default 0.25). Crops are taken at
offsets that are multiples of the factor so the low-res crop is exactly the box-downsampled
high-res crop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core import diffusion
from unclip_jax.core.nn.attention import padding_mask
from unclip_jax.core.nn.layers import dtype as to_dtype
from unclip_jax.core.nn.layers import layer_norm
from unclip_jax.core.nn.transformer import Transformer
from unclip_jax.core.nn.unet import UNet, check_full_res_channels, dense, res_blocks_per_level

AUGMENTATIONS = ("none", "blur", "bsr")


# ============================================================================ configs


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The unCLIP decoder. Defaults: a small CPU-scale 32 px model."""

    image_size: int = 32                      # output side (set from data.image_size)
    clip_workdir: str = ""                    # the frozen CLIP run whose embeddings condition
    clip_dim: int = 64                        # E (set from the CLIP)
    clip_image_size: int = 32                 # CLIP's input side (images are resized to it)
    # U-Net
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int | tuple[int, ...] = 2   # per level, or one count for every level
    attention_resolutions: tuple[int, ...] = (16, 8)   # feature-map sides with attention
    head_channels: int = 32
    dropout: float = 0.0
    resblock_updown: bool = True
    # conditioning
    num_clip_tokens: int = 4
    context_dim: int = 64                     # width of the context tokens (text_width if text)
    text_layers: int = 0                      # 0 = no caption encoder (CLIP embedding only)
    text_width: int = 64
    text_heads: int = 4
    text_class_emb: bool = False              # GLIDE: final caption token → timestep embedding
    vocab_size: int = 512                     # set from the tokenizer
    context_length: int = 32                  # set from data.context_length
    pad_id: int = 0                           # set from the tokenizer
    clip_drop_prob: float = 0.1
    text_drop_prob: float = 0.5
    uncond_drop_prob: float = 0.0             # > 0: both dropped at once, on top (see loss)
    clip_noise: float = 0.0                   # > 0: training noise on the CLIP emb (see loss)
    clip_emb_scale: float = 0.0               # 0 = √clip_dim (unit-norm inputs); Karlo: 1
    clip_mlp: int = 0                         # > 0: residual MLP of this width on the emb
    clip_text_width: int = 0                  # > 0: CLIP text emb + states condition (Karlo)
    groups: int = 32                          # GroupNorm groups of the U-Net
    patch_size: int = 1                       # > 1: U-Net on p×p space-to-depth patches
    full_res_channels: int = 0                # > 0 (patch_size > 1): a full-res path beside it
    repa_weight: float = 0.0                  # > 0: align the U-Net's middle to CLIP's patches
    repa_hidden: int = 256                    #   through an MLP of this width (REPA)
    repa_dim: int = 0                         #   the CLIP tower's width (set from the CLIP)
    repa_min_t: float = 0.0                   #   only at t ≥ this fraction of num_timesteps
    self_condition: float = 0.0               # > 0: self-conditioning (Chen et al. 2022): the
                                              # share of batches given the model's own x₀
    # training input
    embeddings_dir: str = ""                  # CLIP image embeddings cached by `embed` ("" =
                                              # run the frozen image tower in every step)
    # diffusion
    schedule: str = "cosine"
    num_timesteps: int = 1000
    model_output: str = "eps"
    learned_variance: bool = True
    vlb_weight: float = 0.001
    min_snr_gamma: float = 0.0                # > 0: Min-SNR-γ weighting of L_simple (paper: 5)
    timestep_sampling: str = "uniform"        # training t: uniform | logit_normal |
    timestep_loc: float = 0.0                 #   log_sigma_normal (diffusion.sample_timesteps)
    timestep_scale: float = 1.0
    sample_steps: int = 50
    sample_method: str = "ddim"               # the text → image pipeline's default; Karlo: ddpm
    sample_spacing: str = "even"              # "even" | "unclip" (diffusers' Karlo) | "logsnr"
    guidance_scale: float = 3.0
    guidance_interval: tuple[float, ...] = ()  # (σ_lo, σ_hi): guide only there; () = always
    dtype: str = "float32"

    @property
    def use_text(self) -> bool:
        return self.text_layers > 0


@dataclasses.dataclass(frozen=True)
class UpsamplerConfig:
    """A diffusion super-resolution stage ``low_res_size → image_size``."""

    image_size: int = 64                      # target side (set from data.image_size)
    low_res_size: int = 32                    # conditioning side; factor = image_size / this
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int | tuple[int, ...] = 2   # per level, or one count for every level
    dropout: float = 0.0
    resblock_updown: bool = True
    groups: int = 32                          # GroupNorm groups of the U-Net
    patch_size: int = 1                       # > 1: U-Net on p×p space-to-depth patches
    time_shift: str = "scale_shift"           # "scale_shift" | "add" (Karlo's SR U-Nets)
    augment: str = "blur"                     # "blur" (1st stage) | "bsr" (2nd) | "none"
    blur_sigma: tuple[float, float] = (0.4, 0.6)   # σ range of the "blur" augmentation, low-res px
    crop_fraction: float = 0.25               # training crop side / target side
    schedule: str = "cosine"
    num_timesteps: int = 1000
    model_output: str = "eps"
    learned_variance: bool = False
    vlb_weight: float = 0.001
    min_snr_gamma: float = 0.0                # > 0: Min-SNR-γ weighting of L_simple (paper: 5)
    sample_steps: int = 27
    sample_method: str = "ddim"               # the text → image pipeline's default; Karlo: ddpm
    sample_spacing: str = "even"              # "even" | "unclip" (diffusers' Karlo) | "logsnr"
    low_res_resize: str = "linear"            # jax.image.resize method of the low-res input
    last_step: bool = False                   # runs only the final step of the stage before it
    dtype: str = "float32"

    @property
    def factor(self) -> int:
        return self.image_size // self.low_res_size

    @property
    def train_crop(self) -> int:
        """Target-side training crop: ``crop_fraction · image_size`` rounded down to a multiple
        of ``factor · patch_size · 2^(levels-1)`` (so both the crop and its low-res version fit
        the U-Net)."""
        unit = self.factor * self.patch_size * 2 ** (len(self.channel_mult) - 1)
        return max(unit, int(self.crop_fraction * self.image_size) // unit * unit)


def _check_patch(what: str, patch: int, image_size: int, levels: int) -> None:
    unit = patch * 2 ** (levels - 1)
    if patch < 1 or image_size % unit:
        ok = [p for p in (1, 2, 4, 8) if image_size % (p * 2 ** (levels - 1)) == 0]
        raise ValueError(f"{what} patch_size {patch} does not fit {image_size} px images with "
                         f"{levels} U-Net levels (the side must be a multiple of patch_size × "
                         f"2^(levels − 1)); accepted here: {', '.join(map(str, ok))}")


def guidance_interval(cfg: DecoderConfig) -> tuple[float, float] | None:
    """The σ interval the decoder's sampler guides in (None: every step)."""
    return tuple(cfg.guidance_interval) if cfg.guidance_interval else None


def check_decoder_config(cfg: DecoderConfig) -> None:
    """ValueError naming the accepted values for a recipe option the decoder cannot take."""
    _check_patch("decoder", cfg.patch_size, cfg.image_size, len(cfg.channel_mult))
    res_blocks_per_level(cfg.num_res_blocks, len(cfg.channel_mult))
    check_full_res_channels(cfg.full_res_channels, cfg.patch_size)
    diffusion.check_timestep_sampling(cfg.timestep_sampling, cfg.timestep_scale)
    diffusion.check_guidance_interval(guidance_interval(cfg))
    diffusion.check_self_condition(cfg.self_condition)
    for name in ("clip_drop_prob", "text_drop_prob", "uncond_drop_prob"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{name} {getattr(cfg, name)} is not a probability; accepted: "
                             f"0 <= {name} <= 1")
    if cfg.clip_mlp < 0:
        raise ValueError(f"clip_mlp {cfg.clip_mlp} is not a width; accepted: 0 (the paper's "
                         f"linear projections of the embedding) or a positive hidden width")
    if cfg.repa_weight < 0:
        raise ValueError(f"repa_weight {cfg.repa_weight} is not a loss weight; accepted: 0 (no "
                         f"representation alignment, the paper's decoder) or a positive weight "
                         f"(REPA: 0.5)")
    if not 0 <= cfg.repa_min_t < 1:
        raise ValueError(f"repa_min_t {cfg.repa_min_t} is not a fraction of the schedule; "
                         f"accepted: 0 <= repa_min_t < 1 (0: align at every step, REPA's; 0.5: "
                         f"only the noisier half)")
    if cfg.repa_weight > 0 and cfg.repa_hidden < 1:
        raise ValueError(f"repa_hidden {cfg.repa_hidden} is not a width; accepted: a positive "
                         f"hidden width of the alignment MLP")
    if cfg.text_class_emb and not cfg.use_text:
        raise ValueError("text_class_emb adds the caption encoder's final state to the "
                         "timestep embedding and needs a caption encoder; accepted: "
                         "text_layers > 0, or text_class_emb=False")
    side = cfg.image_size // cfg.patch_size
    bad = [r for r in cfg.attention_resolutions if r > side or side % r]
    if bad:
        sides = [side // 2 ** k for k in range(len(cfg.channel_mult))]
        raise ValueError(f"attention_resolutions {bad} are not feature-map sides of this U-Net "
                         f"({cfg.image_size} px, patch_size {cfg.patch_size}); accepted: "
                         f"{', '.join(map(str, sides))}")


def middle_side(cfg: DecoderConfig) -> int:
    """The side of the U-Net's middle (lowest-resolution) feature map."""
    return cfg.image_size // (cfg.patch_size * 2 ** (len(cfg.channel_mult) - 1))


def check_repa_grid(cfg: DecoderConfig, clip_grid: int) -> None:
    """ValueError unless the U-Net's middle feature map can be pooled or repeated onto the CLIP
    tower's ``clip_grid`` × ``clip_grid`` patch tokens (``repa_weight`` > 0)."""
    m = middle_side(cfg)
    if cfg.repa_weight > 0 and m % clip_grid and clip_grid % m:
        raise ValueError(f"representation alignment places the U-Net's {m}×{m} middle features "
                         f"on the CLIP's {clip_grid}×{clip_grid} patch tokens; accepted: a "
                         f"middle side (image_size / (patch_size · 2^(levels − 1))) that is a "
                         f"multiple or a divisor of {clip_grid}, or repa_weight=0")


def repa_loss(features: jax.Array, target: jax.Array) -> jax.Array:
    """REPA's alignment loss per example, ``[B]``: 1 − the cosine similarity between each of the
    projected U-Net features ``[B, h, h, D]`` and the CLIP patch token at the same place
    ``[B, g, g, D]``, averaged over the grid. A finer feature map is average-pooled onto the
    grid; a coarser one is repeated (nearest neighbour, as U-REPA upsamples its U-Net's
    middle)."""
    b, h, _, d = features.shape
    g = target.shape[1]
    if target.shape != (b, g, g, d) or (h % g and g % h):
        raise ValueError(f"alignment features {features.shape} cannot be placed on target "
                         f"tokens {target.shape}; accepted: the same batch and width, and "
                         f"sides that divide one another")
    if h >= g:
        f = features.reshape(b, g, h // g, g, h // g, d).mean(axis=(2, 4))
    else:
        f = jnp.repeat(jnp.repeat(features, g // h, axis=1), g // h, axis=2)
    cos = jnp.sum(f * target, -1) / (jnp.linalg.norm(f, axis=-1) *
                                     jnp.linalg.norm(target, axis=-1) + 1e-6)
    return 1.0 - jnp.mean(cos, axis=(1, 2))


def check_upsampler_config(cfg: UpsamplerConfig) -> None:
    if cfg.image_size % cfg.low_res_size or cfg.image_size <= cfg.low_res_size:
        raise ValueError(f"upsampler image_size {cfg.image_size} must be an integer multiple "
                         f"(> 1) of low_res_size {cfg.low_res_size}")
    if cfg.augment not in AUGMENTATIONS:
        raise ValueError(f"unknown upsampler augment {cfg.augment!r}; accepted: "
                         f"{', '.join(AUGMENTATIONS)}")
    if not 0 < cfg.crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {cfg.crop_fraction}")
    _check_patch("upsampler", cfg.patch_size, cfg.image_size, len(cfg.channel_mult))
    res_blocks_per_level(cfg.num_res_blocks, len(cfg.channel_mult))


# ============================================================================ decoder model


class Decoder(nn.Module):
    """The unCLIP decoder denoiser ``(x_t [B, S, S, 3], t [B], cond) -> [B, S, S, 3 or 6]``.

    Methods (``apply(..., method=...)``): ``__call__``, ``encode_caption(tokens)`` → the
    ``cond["text"]`` dict, ``null_cond()`` → the learned unbatched nulls (same structure as
    ``cond``), ``init_all`` (creates every parameter).
    """

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        side = cfg.image_size // cfg.patch_size          # the U-Net's first feature map
        ds = tuple(side // r for r in cfg.attention_resolutions if r <= side and side % r == 0)
        self.unet = UNet(6 if cfg.learned_variance else 3, cfg.base_channels, cfg.channel_mult,
                         cfg.num_res_blocks, ds, True, cfg.head_channels, cfg.dropout,
                         cfg.resblock_updown, cfg.groups, dtype=dt, patch_size=cfg.patch_size,
                         full_res_channels=cfg.full_res_channels)
        width = self.context_width
        if cfg.clip_mlp > 0:
            self.clip_mlp_in = dense(cfg.clip_mlp)
            self.clip_mlp_out = dense(cfg.clip_dim, names=("mlp", "embed"), zero=True)
        if cfg.repa_weight > 0:
            if cfg.repa_dim < 1:
                raise ValueError("repa_weight > 0 needs repa_dim, the CLIP tower's width (the "
                                 "decoder task sets it from the CLIP)")
            self.repa_in = dense(cfg.repa_hidden)
            self.repa_out = dense(cfg.repa_dim, names=("mlp", "embed"))
        self.clip_to_emb = dense(4 * cfg.base_channels)
        self.clip_to_tokens = dense(cfg.num_clip_tokens * width)
        if cfg.clip_text_width > 0:
            self.text_emb_to_emb = dense(4 * cfg.base_channels)
            self.text_states_proj = dense(width)
            self.text_states_ln = layer_norm()
        self.null_image_emb = self.param(
            "null_image_emb", nn.with_logical_partitioning(nn.initializers.normal(
                cfg.clip_dim ** -0.5), ("embed",)), (cfg.clip_dim,))
        if cfg.use_text:
            self.token_embedding = nn.Embed(
                cfg.vocab_size, cfg.text_width, dtype=dt,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            ("vocab", "embed")))
            self.positional_embedding = self.param(
                "positional_embedding", nn.with_logical_partitioning(
                    nn.initializers.normal(0.01), ("length", "embed")),
                (cfg.context_length, cfg.text_width))
            self.text_encoder = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads,
                                            act="gelu", dtype=dt)
            self.text_ln = layer_norm()
            if cfg.text_class_emb:
                self.text_to_emb = dense(4 * cfg.base_channels)
            self.null_text = self.param(
                "null_text", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                          ("length", "embed")),
                (cfg.context_length, cfg.text_width))

    @property
    def context_width(self) -> int:
        return self.config.text_width if self.config.use_text else self.config.context_dim

    def encode_caption(self, tokens: jax.Array) -> dict:
        """``[B, L]`` int tokens → ``{"states": [B, L, W] float32, "valid": [B, L] bool}``."""
        cfg = self.config
        if not cfg.use_text:
            raise ValueError("this decoder has no caption encoder (text_layers=0)")
        if tokens.shape[1] != cfg.context_length:
            raise ValueError(f"caption tokens have length {tokens.shape[1]}; the decoder was "
                             f"built for context_length {cfg.context_length}")
        valid = tokens != cfg.pad_id
        x = self.token_embedding(tokens) + self.positional_embedding.astype(
            to_dtype(cfg.dtype))
        x = self.text_encoder(x, mask=padding_mask(valid))
        return {"states": self.text_ln(x).astype(jnp.float32), "valid": valid}

    def null_cond(self) -> dict:
        """The learned nulls, unbatched: ``{"image_emb": [E], "text": {"states": [L, W],
        "valid": [L]}}`` (no "text" without a caption encoder)."""
        out = {"image_emb": self.null_image_emb}
        if self.config.use_text:
            out["text"] = {"states": self.null_text,
                           "valid": jnp.ones((self.config.context_length,), jnp.bool_)}
        return out

    def __call__(self, x_t: jax.Array, t: jax.Array, cond: dict, *,
                 deterministic: bool = True, return_features: bool = False):
        """``x_t`` ``[B, S, S, 3]``, ``t`` ``[B]``, ``cond`` (module docstring) →
        ``[B, S, S, 3]`` (ε / x₀ / v) or ``[B, S, S, 6]`` with the learned-variance channels;
        with ``return_features`` (``repa_weight`` > 0) also the U-Net's middle features through
        the alignment MLP, ``[B, m, m, repa_dim]`` (training only: sampling never reads them)."""
        cfg = self.config
        if x_t.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"decoder input has shape {x_t.shape}; expected "
                             f"[B, {cfg.image_size}, {cfg.image_size}, 3]")
        scale = cfg.clip_emb_scale if cfg.clip_emb_scale > 0 else math.sqrt(cfg.clip_dim)
        emb = cond["image_emb"].astype(jnp.float32) * scale
        if cfg.clip_mlp > 0:            # zero-initialised: starts as the paper's projections
            emb = emb + self.clip_mlp_out(nn.silu(self.clip_mlp_in(emb)))
        b = emb.shape[0]
        tokens = self.clip_to_tokens(emb).reshape(b, cfg.num_clip_tokens, self.context_width)
        context, mask = tokens, jnp.ones((b, cfg.num_clip_tokens), jnp.bool_)
        time_emb = self.clip_to_emb(emb)
        if cfg.clip_text_width > 0:
            clip_text = cond.get("clip_text")
            if clip_text is None:
                raise ValueError("this decoder is conditioned on CLIP text features "
                                 "(clip_text_width > 0): cond needs 'clip_text' with 'emb', "
                                 "'states' and 'valid'")
            time_emb = time_emb + self.text_emb_to_emb(clip_text["emb"].astype(jnp.float32))
            states = self.text_states_ln(self.text_states_proj(
                clip_text["states"].astype(jnp.float32)))
            context = jnp.concatenate([context, states], axis=1)
            mask = jnp.concatenate([mask, clip_text["valid"].astype(jnp.bool_)], axis=1)
        text = cond.get("text")
        if cfg.use_text:
            if text is None:
                raise ValueError("this decoder has a caption encoder: cond needs 'text' "
                                 "(encode_caption(tokens), or the null)")
            states = text["states"].astype(jnp.float32)
            context = jnp.concatenate([context, states], axis=1)
            mask = jnp.concatenate([mask, text["valid"].astype(jnp.bool_)], axis=1)
            if cfg.text_class_emb:       # GLIDE: the final token's state as a class embedding
                last = jnp.sum(text["valid"].astype(jnp.int32), axis=1) - 1
                final = jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
                time_emb = time_emb + self.text_to_emb(final)
        if cfg.self_condition > 0:      # the previous x₀ estimate beside x_t (zeros: none)
            sc = cond.get("self_cond")
            x_t = jnp.concatenate([x_t, jnp.zeros_like(x_t) if sc is None
                                   else sc.astype(x_t.dtype)], axis=-1)
        if not return_features:
            return self.unet(x_t, t, emb=time_emb, context=context, context_mask=mask,
                             deterministic=deterministic)
        if cfg.repa_weight <= 0:
            raise ValueError("return_features needs the alignment MLP (repa_weight > 0)")
        out, middle = self.unet(x_t, t, emb=time_emb, context=context, context_mask=mask,
                                deterministic=deterministic, return_middle=True)
        return out, self.repa_out(nn.silu(self.repa_in(middle)))

    def init_all(self, x_t, t, cond, tokens=None):
        if self.config.use_text:
            cond = dict(cond, text=self.encode_caption(tokens))
        self.null_cond()
        return self(x_t, t, cond, return_features=self.config.repa_weight > 0)


def init_decoder(cfg: DecoderConfig, rng: jax.Array, batch: int = 1):
    """Boxed variables of a fresh decoder (``{"params": …}``)."""
    x, t, cond, tokens = _decoder_dummy(cfg, batch)
    return jax.jit(functools.partial(Decoder(cfg).init, method=Decoder.init_all))(
        rng, x, t, cond, tokens)


def _decoder_dummy(cfg: DecoderConfig, batch: int):
    s = cfg.image_size
    cond = {"image_emb": jnp.zeros((batch, cfg.clip_dim))}
    if cfg.clip_text_width > 0:
        cond["clip_text"] = {"emb": jnp.zeros((batch, cfg.clip_dim)),
                             "states": jnp.zeros((batch, cfg.context_length,
                                                  cfg.clip_text_width)),
                             "valid": jnp.ones((batch, cfg.context_length), jnp.bool_)}
    return (jnp.zeros((batch, s, s, 3)), jnp.zeros((batch,), jnp.int32), cond,
            jnp.zeros((batch, cfg.context_length), jnp.int32))


def make_denoiser(cfg: DecoderConfig, dropout_rng: jax.Array | None = None,
                  repa_target: jax.Array | None = None):
    """``denoiser(params, x_t, t, cond) -> output``, the shared sampler's contract. With a
    ``dropout_rng`` the U-Net's dropout is active (training). With ``repa_target`` (the CLIP
    patch tokens of the batch's clean images, ``[B, g, g, repa_dim]``) it returns ``(output,
    repa_weight · repa_loss)``, the training loss's auxiliary term, zero for the examples whose
    timestep is below ``repa_min_t · num_timesteps``."""
    model = Decoder(cfg)

    align = repa_target is not None

    def denoiser(params, x_t, t, cond):
        out = model.apply({"params": params}, x_t, t, cond,
                          deterministic=dropout_rng is None, return_features=align,
                          rngs=None if dropout_rng is None else {"dropout": dropout_rng})
        if not align:
            return out
        out, features = out
        aligned = t >= cfg.repa_min_t * cfg.num_timesteps
        return out, cfg.repa_weight * aligned * repa_loss(features, repa_target)

    return denoiser


def encode_caption(params, cfg: DecoderConfig, tokens: jax.Array) -> dict:
    return Decoder(cfg).apply({"params": params}, tokens, method=Decoder.encode_caption)


def null_cond(params, cfg: DecoderConfig) -> dict:
    """The learned null conditioning, unbatched (see :meth:`Decoder.null_cond`)."""
    return Decoder(cfg).apply({"params": params}, method=Decoder.null_cond)


def batched(tree: Any, batch: int) -> Any:
    """Broadcast every leaf of an unbatched pytree to a leading ``batch`` axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), tree)


def fit_tokens(tokens: jax.Array, length: int, pad_id: int) -> jax.Array:
    """Pad (with ``pad_id``) or cut ``[B, L]`` tokens to ``[B, length]``."""
    if tokens.shape[1] >= length:
        return tokens[:, :length]
    return jnp.pad(tokens, ((0, 0), (0, length - tokens.shape[1])), constant_values=pad_id)


def make_cond(params, cfg: DecoderConfig, image_emb: jax.Array,
              tokens: jax.Array | None = None, clip_text: dict | None = None) -> dict:
    """``cond`` for the denoiser from CLIP image embeddings ``[B, E]`` and caption tokens
    (and, for a ``clip_text_width > 0`` decoder, the CLIP text features ``clip_text``)."""
    cond = {"image_emb": jnp.asarray(image_emb, jnp.float32)}
    if cfg.clip_text_width > 0:
        if clip_text is None:
            raise ValueError("this decoder is conditioned on CLIP text features "
                             "(clip_text_width > 0): pass clip_text={'emb', 'states', 'valid'}")
        cond["clip_text"] = clip_text
    if cfg.use_text:
        if tokens is None:
            raise ValueError("this decoder has a caption encoder: pass caption tokens")
        cond["text"] = encode_caption(params, cfg, jnp.asarray(tokens, jnp.int32))
    return cond


def decoder_loss(params, cfg: DecoderConfig, x0: jax.Array, image_emb: jax.Array,
                 tokens: jax.Array | None, rng: jax.Array, clip_text: dict | None = None,
                 clip_text_null: dict | None = None, repa_target: jax.Array | None = None):
    """The decoder's diffusion loss on images ``x0`` ``[B, S, S, 3]`` in [-1, 1] with their
    CLIP image embeddings; conditioning dropped to the learned nulls for guidance.

    A decoder reading CLIP text features (``clip_text_width > 0``) takes the caption's
    ``clip_text`` (``{"emb": [B, E] raw, "states": [B, L, W], "valid": [B, L]}``) and, as its
    null, ``clip_text_null`` (the same structure, unbatched: the empty caption's encoding, what
    the pipeline guides against); it is dropped with ``text_drop_prob``.

    ``cfg.uncond_drop_prob`` = q > 0 drops every conditioning input (embedding, caption) at
    once for a fraction q of the examples, on top of the independent drops:
    the unconditional input guidance extrapolates from then trains on q + (1 − q) ·
    clip_drop_prob · text_drop_prob of them instead of the product alone (2 % at 0.1 × 0.2).

    ``cfg.clip_noise`` = σ_max > 0 augments the embedding (training only): z ← (z + σ n) /
    ‖z + σ n‖ with σ ~ U[0, σ_max] per example and n ~ N(0, I/E) (so ‖σ n‖ ≈ σ), making the
    decoder read a neighbourhood of each training embedding rather than the point.

    ``cfg.repa_weight`` = λ > 0 adds REPA's representation alignment (Yu et al. 2024; U-REPA's
    choice of the U-Net's middle for a U-Net): λ · (1 − cos) between the middle features of
    the noisy input, through an MLP, and ``repa_target``, the frozen CLIP tower's patch tokens
    of the clean image (``FrozenCLIP.image_patch_tokens``), so the U-Net learns early what
    the CLIP sees at each place. Sampling never reads the MLP. ``cfg.repa_min_t`` > 0 aligns
    only the examples drawn at t ≥ repa_min_t · T (the noisier steps, where the layout is still
    to be decided), leaving the low-noise steps to the diffusion loss alone.

    ``cfg.self_condition`` = p > 0 trains a self-conditioned decoder (Chen et al. 2022): the
    U-Net reads its own x₀ estimate (``cond["self_cond"]``) beside ``x_t``, for a fraction p of
    the batches (the rest read zeros); the sampler passes each step the previous step's x₀."""
    if cfg.repa_weight > 0 and repa_target is None:
        raise ValueError("repa_weight > 0: pass repa_target, the CLIP patch tokens of x0")
    rng_drop, rng_loss = jax.random.split(rng)
    if cfg.clip_noise > 0:
        r_sigma, r_n = jax.random.split(jax.random.fold_in(rng, 1))
        sigma = cfg.clip_noise * jax.random.uniform(r_sigma, (image_emb.shape[0], 1))
        noise = jax.random.normal(r_n, image_emb.shape) * image_emb.shape[-1] ** -0.5
        image_emb = image_emb + sigma * noise
        image_emb = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
    cond = make_cond(params, cfg, image_emb, tokens, clip_text)
    probs = {"image_emb": cfg.clip_drop_prob}
    if cfg.use_text:
        probs["text"] = cfg.text_drop_prob
    if cfg.clip_text_width > 0:
        if clip_text_null is None:
            raise ValueError("a decoder reading CLIP text features needs clip_text_null (the "
                             "empty caption's CLIP encoding) to drop the caption to")
        probs["clip_text"] = cfg.text_drop_prob

    def nulls(p):
        out = null_cond(p, cfg)
        return out if clip_text_null is None else {**out, "clip_text": clip_text_null}

    return diffusion.training_loss(
        params, x0, cond, rng_loss, denoiser=make_denoiser(
            cfg, rng_drop if cfg.dropout > 0 else None,
            repa_target if cfg.repa_weight > 0 else None),
        schedule=diffusion.make_schedule(cfg.schedule, cfg.num_timesteps),
        model_output=cfg.model_output, learned_variance=cfg.learned_variance,
        vlb_weight=cfg.vlb_weight, min_snr_gamma=cfg.min_snr_gamma, cond_drop_prob=probs,
        null_cond=nulls, cond_joint_drop_prob=cfg.uncond_drop_prob,
        timestep_sampling=cfg.timestep_sampling,
        timestep_loc=cfg.timestep_loc, timestep_scale=cfg.timestep_scale,
        self_condition=cfg.self_condition)


# ============================================================================ upsampler model


def resize_to(x: jax.Array, size: int | tuple[int, int], method: str = "linear") -> jax.Array:
    """Resize ``[B, h, w, C]`` to ``[B, size, size, C]`` (or ``size = (H, W)``), antialiased
    when shrinking."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if x.shape[1:3] == hw:
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), method=method)


def box_downsample(x: jax.Array, factor: int) -> jax.Array:
    """Average ``factor × factor`` blocks: ``[B, H, W, C] -> [B, H/f, W/f, C]``."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}×{w} is not divisible by the downsampling factor {factor}")
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class Upsampler(nn.Module):
    """Super-resolution denoiser ``(x_t [B, H, W, 3], t, {"low_res": [B, H/f, W/f, 3]})
    -> [B, H, W, 3 or 6]``; fully convolutional (any H = f · low-res side, divisible by the
    U-Net's downsampling)."""

    config: UpsamplerConfig

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array, cond: dict, *,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        low = cond["low_res"]
        f = cfg.factor
        if (low.ndim != 4 or x_t.ndim != 4 or low.shape[1] * f != x_t.shape[1]
                or low.shape[2] * f != x_t.shape[2]):
            raise ValueError(
                f"low-res image {tuple(low.shape[1:3])} × factor {f} does not match the target "
                f"{tuple(x_t.shape[1:3])}; accepted: a low-res side of exactly target side / "
                f"{f} ({cfg.low_res_size} → {cfg.image_size} in this config, or any crop of it)")
        unet = UNet(6 if cfg.learned_variance else 3, cfg.base_channels, cfg.channel_mult,
                    cfg.num_res_blocks, attention_ds=(), middle_attention=False,
                    dropout=cfg.dropout, resblock_updown=cfg.resblock_updown,
                    groups=cfg.groups, dtype=to_dtype(cfg.dtype), time_shift=cfg.time_shift,
                    patch_size=cfg.patch_size, name="unet")
        unet.check_input(x_t.shape[1], x_t.shape[2])
        up = jax.image.resize(low.astype(jnp.float32), x_t.shape[:3] + (low.shape[3],),
                              method=cfg.low_res_resize)
        return unet(jnp.concatenate([x_t, up], axis=-1), t, deterministic=deterministic)


def init_upsampler(cfg: UpsamplerConfig, rng: jax.Array, batch: int = 1):
    s, lo = cfg.train_crop, cfg.train_crop // cfg.factor
    return jax.jit(Upsampler(cfg).init)(rng, jnp.zeros((batch, s, s, 3)),
                                        jnp.zeros((batch,), jnp.int32),
                                        {"low_res": jnp.zeros((batch, lo, lo, 3))})


def make_upsampler_denoiser(cfg: UpsamplerConfig, dropout_rng: jax.Array | None = None):
    model = Upsampler(cfg)

    def denoiser(params, x_t, t, cond):
        return model.apply({"params": params}, x_t, t, cond,
                           deterministic=dropout_rng is None,
                           rngs=None if dropout_rng is None else {"dropout": dropout_rng})

    return denoiser


# ---------------------------------------------------------------------------- augmentation


def gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int = 3) -> jax.Array:
    """Separable Gaussian blur of ``[B, H, W, C]`` with a per-example ``sigma`` ``[B]`` (pixels),
    edge padding, ``2·radius + 1`` taps. Jittable; σ → 0 is the identity."""
    k = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    s = jnp.maximum(sigma.astype(jnp.float32), 1e-3)[:, None]
    w = jnp.exp(-0.5 * (k[None] / s) ** 2)
    w = w / w.sum(axis=1, keepdims=True)                          # [B, taps]
    pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
    xp = jnp.pad(x, pad, mode="edge")
    h, wd = x.shape[1], x.shape[2]
    rows = sum(w[:, i, None, None, None] * xp[:, i:i + h] for i in range(2 * radius + 1))
    return sum(w[:, i, None, None, None] * rows[:, :, i:i + wd] for i in range(2 * radius + 1))


_JPEG_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)


def _dct_matrix(n: int = 8) -> np.ndarray:
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def jpeg_like(x: jax.Array, quality: jax.Array) -> jax.Array:
    """A jittable JPEG approximation of ``[B, H, W, 3]`` in [-1, 1] at per-example ``quality``
    ``[B]`` (1–100): per-channel 8×8 DCT, quantisation with the standard luminance table scaled
    by the IJG quality rule, inverse DCT, 8-bit rounding. (No chroma subsampling or YCbCr.)"""
    b, h, w, c = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    pix = jnp.pad((x + 1.0) * 127.5 - 128.0, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = pix.shape[1] // 8, pix.shape[2] // 8
    blocks = pix.reshape(b, hh, 8, ww, 8, c)
    d = jnp.asarray(_dct_matrix())
    coef = jnp.einsum("ij,bhjwkc,lk->bhiwlc", d, blocks, d)
    q = jnp.clip(quality.astype(jnp.float32), 1.0, 100.0)
    scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q) / 100.0
    table = jnp.maximum(jnp.floor(jnp.asarray(_JPEG_LUMA)[None] * scale[:, None, None] + 0.5),
                        1.0)[:, None, :, None, :, None]
    coef = jnp.round(coef / table) * table
    back = jnp.einsum("ji,bhjwkc,kl->bhiwlc", d, coef, d).reshape(b, hh * 8, ww * 8, c)
    back = jnp.clip(jnp.round(back + 128.0), 0.0, 255.0)[:, :h, :w]
    return back / 127.5 - 1.0


def bsr_degrade(x: jax.Array, rng: jax.Array) -> jax.Array:
    """BSR-style degradation (Zhang et al. 2021, as used by unCLIP's second upsampler), a
    jittable approximation on ``[B, H, W, 3]`` in [-1, 1]: Gaussian blur σ ~ U(0.1, 1.5) px →
    resize down by a random factor in {1, 3/4, 1/2} and back (bilinear) → Gaussian noise of
    std ~ U(0, 0.1) → JPEG-like quantisation at quality ~ U(30, 95). Same shape, in [-1, 1]."""
    b, h, w, c = x.shape
    k = jax.random.split(rng, 5)
    x = gaussian_blur(x, jax.random.uniform(k[0], (b,), minval=0.1, maxval=1.5))
    variants = [x] + [resize_to(resize_to(x, (max(2, round(h * s)), max(2, round(w * s)))),
                                (h, w)) for s in (0.75, 0.5)]
    choice = jax.random.randint(k[1], (b,), 0, len(variants))
    x = jnp.stack(variants)[choice, jnp.arange(b)]
    std = jax.random.uniform(k[2], (b, 1, 1, 1), maxval=0.1)
    x = x + std * jax.random.normal(k[3], x.shape)
    x = jpeg_like(jnp.clip(x, -1.0, 1.0), jax.random.uniform(k[4], (b,), minval=30., maxval=95.))
    return jnp.clip(x, -1.0, 1.0)


def augment_low_res(cfg: UpsamplerConfig, low: jax.Array, rng: jax.Array) -> jax.Array:
    """The configured conditioning augmentation of a low-res batch (training only)."""
    if cfg.augment == "blur":
        sigma = jax.random.uniform(rng, (low.shape[0],), minval=cfg.blur_sigma[0],
                                   maxval=cfg.blur_sigma[1])
        return gaussian_blur(low, sigma)
    if cfg.augment == "bsr":
        return bsr_degrade(low, rng)
    return low


def random_crops(x: jax.Array, size: int, unit: int, rng: jax.Array) -> jax.Array:
    """Per-example random ``size × size`` crops of ``[B, H, W, C]`` at offsets that are
    multiples of ``unit``."""
    b, h, w, c = x.shape
    if size > min(h, w):
        raise ValueError(f"crop {size} is larger than the images {h}×{w}")
    ky, kx = jax.random.split(rng)
    oy = jax.random.randint(ky, (b,), 0, (h - size) // unit + 1) * unit
    ox = jax.random.randint(kx, (b,), 0, (w - size) // unit + 1) * unit
    return jax.vmap(lambda im, y, x_: jax.lax.dynamic_slice(im, (y, x_, 0), (size, size, c)))(
        x, oy, ox)


def upsampler_loss(params, cfg: UpsamplerConfig, images: jax.Array, rng: jax.Array):
    """Loss on full-resolution images ``[B, S, S, 3]`` in [-1, 1]: random training crops, their
    box-downsampled and augmented low-res versions as conditioning."""
    rc, ra, rl, rd = jax.random.split(rng, 4)
    hi = random_crops(images.astype(jnp.float32), cfg.train_crop, cfg.factor, rc)
    low = augment_low_res(cfg, box_downsample(hi, cfg.factor), ra)
    return diffusion.training_loss(
        params, hi, {"low_res": low}, rl,
        denoiser=make_upsampler_denoiser(cfg, rd if cfg.dropout > 0 else None),
        schedule=diffusion.make_schedule(cfg.schedule, cfg.num_timesteps),
        model_output=cfg.model_output, learned_variance=cfg.learned_variance,
        vlb_weight=cfg.vlb_weight, min_snr_gamma=cfg.min_snr_gamma)


# ============================================================================ frozen CLIP text


def decoder_text_features(text: dict) -> dict:
    """A frozen CLIP's caption features (:meth:`unclip_jax.models.clip.FrozenCLIP.encode_text`)
    as a ``clip_text_width > 0`` decoder (Karlo) reads them: ``{"emb": [B, E]`` the projected
    EOS feature before normalisation, ``"states": [B, L, W]``, ``"valid": [B, L]}``."""
    return {"emb": text["raw"], "states": text["states"], "valid": text["valid"]}


def empty_caption_features(clip, tokenizer, context_length: int) -> dict:
    """The empty caption's :func:`decoder_text_features`, unbatched: the unconditional text
    input of a ``clip_text_width > 0`` decoder (it has no learned null text)."""
    tokens = jnp.asarray(tokenizer.encode([""], context_length))
    return jax.tree.map(lambda x: x[0], decoder_text_features(clip.encode_text(tokens)))


__all__ = [
    "AUGMENTATIONS", "Decoder", "DecoderConfig", "Upsampler", "UpsamplerConfig",
    "augment_low_res", "box_downsample", "bsr_degrade",
    "check_decoder_config", "check_upsampler_config", "guidance_interval",
    "decoder_loss", "decoder_text_features", "empty_caption_features",
    "encode_caption", "fit_tokens", "gaussian_blur", "init_decoder",
    "init_upsampler", "jpeg_like",
    "make_cond", "make_denoiser", "make_upsampler_denoiser",
    "null_cond", "random_crops",
    "upsampler_loss",
]
