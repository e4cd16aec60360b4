"""The ADM / GLIDE U-Net (Dhariwal & Nichol 2021; Nichol et al. 2021), NHWC.

``UNet(x [B, H, W, Cin], t [B]) -> [B, H, W, out_channels]``:

* a sinusoidal timestep embedding → 2-layer MLP (width ``4 · base_channels``), to which an
  optional extra embedding ``emb`` (e.g. unCLIP's projected CLIP image embedding) is *added*;
* ``len(channel_mult)`` levels of ``num_res_blocks`` residual blocks (GroupNorm → SiLU → conv,
  timestep injected by scale-shift ``norm(h)·(1 + scale) + shift``, dropout, zero-initialised
  output conv), attention blocks at the configured downsampling factors, a middle block, and
  the mirrored decoder path with skip connections;
* down/up-sampling by BigGAN-style residual blocks (``resblock_updown``) or by a stride-2 conv /
  nearest-neighbour ×2 + conv;
* attention blocks run the package's one :class:`~unclip_jax.core.nn.attention.MultiHeadAttention`
  over the ``H·W`` tokens, with optional external ``context`` tokens ``[B, Lc, Dc]`` whose
  keys/values are concatenated to the spatial ones (GLIDE's text / unCLIP's CLIP tokens).
  The attention output passes through a zero-initialised per-channel gate, so each attention
  residual branch starts as the identity (the role ADM's zero-initialised ``proj_out`` plays);
* the final GroupNorm → SiLU → conv is zero-initialised (the model outputs 0 at init);
* ``patch_size = p > 1`` ("simple diffusion", Hoogeboom et al. 2023): the input is folded
  space-to-depth into ``[B, H/p, W/p, p²·Cin]`` before the first conv and the output unfolded
  depth-to-space from ``p²·out_channels`` channels, so the first level runs at ``1/p`` of the
  resolution (``1/p²`` of its convolution FLOPs) while input and output keep their shapes;
* ``full_res_channels = c > 0`` (with ``p > 1``): a shallow full-resolution path beside the
  patched U-Net. A 3×3 conv reads the input at full resolution into ``c`` channels; at the end
  the last features are unfolded depth-to-space into ``c`` channels, added to it, and two
  GroupNorm → SiLU → 3×3 conv layers (the last zero-initialised) add their output to the
  unfolded one: pixel-level detail (a 2 px arm of a small cross) need not pass through the
  ``p × p`` patches.

``time_shift="add"`` injects the timestep additively instead (``h + proj(emb)`` before the
second GroupNorm, diffusers' ``resnet_time_scale_shift="default"``, as Karlo's super-resolution
U-Nets need); the default scale-shift is ADM's.

Conv kernels carry the logical names ``(None, None, "conv_in", "conv_out")``; activations
``("batch", "height", "width", "act_embed")``. GroupNorm and the timestep arithmetic are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.core.nn.attention import MultiHeadAttention
from unclip_jax.core.nn.layers import conv_general_dilated

Dtype = Any

ACT_NAMES = ("batch", "height", "width", "act_embed")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding ``[B] -> [B, dim]`` float32 (cos half first, as in ADM)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def conv(features: int, kernel: int = 3, stride: int = 1, *, zero: bool = False,
         dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
    """A same-padded 2-D conv with logically named kernel (zero-initialised when ``zero``).
    The kernel's FSDP shards are gathered before the conv (an XLA partitioner bug otherwise
    can misplace examples in the input gradient; see :func:`sharding.gathered_kernel_conv`);
    a 1×1 conv runs as a matmul (:func:`~unclip_jax.core.nn.layers.conv_general_dilated`)."""
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   dtype=dtype, param_dtype=jnp.float32, name=name,
                   kernel_init=nn.with_logical_partitioning(
                       init, (None, None, "conv_in", "conv_out")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                   conv_general_dilated=conv_general_dilated((None, None, None, "conv_out")))


def dense(features: int, *, dtype: Dtype = jnp.float32, name: str | None = None,
          names: tuple = ("embed", "mlp"), zero: bool = False) -> nn.Dense:
    init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.with_logical_partitioning(init, names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


TIME_SHIFTS = ("scale_shift", "add")


class GroupNorm(nn.Module):
    """GroupNorm ``[B, ..., C] -> [B, ..., C]`` in float32, parameters ``scale`` and ``bias``
    (the names and values of ``flax.linen.GroupNorm``, which it matches to float32 round-off).

    Written for XLA:CPU speed (5-7× faster than ``nn.GroupNorm`` on U-Net activations; the
    equality is tested in ``tests/test_nn_speed_equivalence.py``): one pass sums ``x`` and
    ``x²`` per channel (a reduction over the contiguous spatial rows), a small matmul with the
    group-membership matrix turns the per-channel sums into each channel's group mean and mean
    square, and the normalisation is the per-channel affine ``x·a + c``, which XLA fuses into
    the following elementwise ops. (``nn.GroupNorm`` reduces over a ``[..., G, C/G]`` view and
    broadcasts group statistics back through it, which XLA:CPU turns into strided loops with
    per-element index arithmetic.) Variance as ``E[x²] - E[x]²`` clamped at 0, as
    ``nn.GroupNorm`` does.
    """

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"{c} channels are not divisible by {self.num_groups} groups")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("norm",)), (c,), jnp.float32)
        x = x.astype(jnp.float32)
        rows = x.reshape(b, -1, c)
        sums = jnp.stack([rows.sum(1), (rows * rows).sum(1)], axis=1)           # [B, 2, C]
        group = jnp.arange(c) // (c // self.num_groups)
        count = rows.shape[1] * (c // self.num_groups)
        member = (group[:, None] == group[None, :]).astype(jnp.float32) / count  # [C, C]
        mean, mean_sq = jnp.unstack(
            jnp.matmul(sums, member, precision=jax.lax.Precision.HIGHEST), axis=1)
        a = scale * jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
        shape = (b,) + (1,) * (x.ndim - 2) + (c,)
        return x * a.reshape(shape) + (bias - mean * a).reshape(shape)


def group_norm(channels: int, groups: int = 32, name: str | None = None) -> GroupNorm:
    """GroupNorm in float32 with ``gcd(groups, channels)`` groups."""
    return GroupNorm(num_groups=math.gcd(groups, channels), epsilon=1e-5, name=name)


def downsample_2x(x: jax.Array) -> jax.Array:
    """2×2 average pooling ``[B, H, W, C] -> [B, H/2, W/2, C]``."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour ×2 ``[B, H, W, C] -> [B, 2H, 2W, C]``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """``[B, H, W, C] -> [B, H/p, W/p, p·p·C]``; channel ``(dy·p + dx)·C + c`` of output pixel
    ``(y, x)`` is input pixel ``(p·y + dy, p·x + dx)``'s channel ``c``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of :func:`space_to_depth`: ``[B, h, w, p·p·C] -> [B, p·h, p·w, C]``."""
    b, h, w, cc = x.shape
    c = cc // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def _constrain(x):
    return nn.with_logical_constraint(x, ACT_NAMES)


class ResBlock(nn.Module):
    """ADM residual block ``[B, H, W, C] -> [B, H', W', out]`` with scale-shift timestep FiLM.

    ``resample``: None, "down" (avg-pool ×½ of both paths) or "up" (nearest ×2), BigGAN style.
    """

    out_channels: int
    dropout: float = 0.0
    resample: str | None = None
    groups: int = 32
    dtype: Dtype = jnp.float32
    time_shift: str = "scale_shift"          # "scale_shift" (ADM) | "add" (h + proj(emb))

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.time_shift not in TIME_SHIFTS:
            raise ValueError(f"unknown time_shift {self.time_shift!r}; accepted: "
                             f"{', '.join(TIME_SHIFTS)}")
        act = jax.nn.silu
        h = act(group_norm(x.shape[-1], self.groups, "norm_1")(x)).astype(self.dtype)
        if self.resample is not None:
            fn = downsample_2x if self.resample == "down" else upsample_2x
            h, x = fn(h), fn(x)
        h = conv(self.out_channels, dtype=self.dtype, name="conv_1")(h)
        if self.time_shift == "add":
            shift = dense(self.out_channels, dtype=jnp.float32, name="emb_proj")(act(emb))
            h = group_norm(self.out_channels, self.groups, "norm_2")(
                h.astype(jnp.float32) + shift[:, None, None, :])
        else:
            film = dense(2 * self.out_channels, dtype=jnp.float32, name="emb_proj")(act(emb))
            scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
            h = group_norm(self.out_channels, self.groups, "norm_2")(h) * (1.0 + scale) + shift
        h = act(h).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
        h = conv(self.out_channels, zero=True, dtype=self.dtype, name="conv_2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, dtype=self.dtype, name="skip")(x)
        return _constrain(x.astype(self.dtype) + h)


class AttentionBlock(nn.Module):
    """Self-attention over the ``H·W`` tokens (plus optional context keys/values), residual.

    ``context``: ``[B, Lc, Dc]``; ``context_mask``: ``[B, Lc]`` bool (True = may attend).
    """

    num_heads: int
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None,
                 context_mask: jax.Array | None = None) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = group_norm(c, self.groups, "norm")(x).astype(self.dtype).reshape(b, hgt * wid, c)
        mask = None
        if context is not None and context_mask is not None:
            own = jnp.ones((b, hgt * wid), jnp.bool_)
            mask = jnp.concatenate([own, context_mask.astype(jnp.bool_)], 1)[:, None, None]
        h = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
            h, mask=mask, context=context)
        gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (c,), jnp.float32)
        return _constrain(x + (h * gate.astype(self.dtype)).reshape(b, hgt, wid, c))


def check_full_res_channels(channels: int, patch_size: int) -> None:
    """ValueError unless ``channels`` is 0, or ≥ 1 with ``patch_size > 1``."""
    if channels < 0 or (channels and patch_size == 1):
        raise ValueError(f"full_res_channels {channels} does not fit patch_size {patch_size}; "
                         f"accepted: 0, or a channel count ≥ 1 with patch_size > 1 (a "
                         f"full-resolution path beside the patched U-Net)")


def res_blocks_per_level(num_res_blocks: int | Sequence[int], levels: int) -> tuple[int, ...]:
    """``num_res_blocks`` as one count per level (an int repeats); ValueError naming the
    accepted values if it is not ≥ 1 blocks at each of the ``levels`` levels."""
    blocks = ((num_res_blocks,) * levels if isinstance(num_res_blocks, int)
              else tuple(num_res_blocks))
    if len(blocks) != levels or any(not isinstance(n, int) or n < 1 for n in blocks):
        raise ValueError(f"num_res_blocks {num_res_blocks!r} does not fit a U-Net of {levels} "
                         f"levels; accepted: one int ≥ 1 for every level, or {levels} ints "
                         f"≥ 1, one per level (first = the largest feature map)")
    return blocks


class UNet(nn.Module):
    """ADM/GLIDE U-Net ``[B, H, W, Cin] -> [B, H, W, out_channels]`` (see module docstring).

    Attributes:
      out_channels: output channels (``2C`` for a learned-variance denoiser of C channels).
      base_channels: channels of the first level; level ``i`` has ``base · channel_mult[i]``.
      channel_mult: one multiplier per level; H and W must be divisible by
        ``2 ** (len(channel_mult) - 1)``.
      num_res_blocks: residual blocks per level (the up path has one more): one int for every
        level, or one per level (e.g. ``(2, 1, 1)``: capacity where the feature map is largest).
      attention_ds: downsampling factors (1, 2, 4, …) whose levels get attention blocks.
      middle_attention: an attention block between the middle residual blocks.
      head_channels: channels per attention head (heads = channels // head_channels).
      dropout: dropout rate inside residual blocks (needs a ``dropout`` rng when training).
      resblock_updown: BigGAN-style residual up/down-sampling (else strided conv / nearest+conv).
      groups: GroupNorm groups (at most; ``gcd`` with the channels).
      time_shift: how residual blocks take the timestep ("scale_shift" or "add").
      patch_size: space-to-depth factor of the input (1 = none); ``attention_ds`` counts from
        the patched resolution.
      full_res_channels: > 0 (needs ``patch_size > 1``): channels of the full-resolution path
        beside the patched U-Net (module docstring).
    """

    out_channels: int
    base_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int | Sequence[int] = 2
    attention_ds: Sequence[int] = (2, 4)
    middle_attention: bool = True
    head_channels: int = 32
    dropout: float = 0.0
    resblock_updown: bool = True
    groups: int = 32
    dtype: Dtype = jnp.float32
    time_shift: str = "scale_shift"
    patch_size: int = 1
    full_res_channels: int = 0

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels

    @property
    def downsampling(self) -> int:
        """The total downsampling factor (patching included): input sides must be divisible
        by it."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def check_input(self, height: int, width: int) -> None:
        if self.patch_size < 1:
            raise ValueError(f"U-Net patch_size must be ≥ 1 (1 = no patching), got "
                             f"{self.patch_size}")
        check_full_res_channels(self.full_res_channels, self.patch_size)
        d = self.downsampling
        if height % d or width % d:
            raise ValueError(
                f"U-Net input {height}×{width} is not divisible by its downsampling factor {d} "
                f"(patch_size {self.patch_size} × 2^(len(channel_mult) - 1), "
                f"channel_mult={tuple(self.channel_mult)}); accepted: sides that are "
                f"multiples of {d}")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, emb: jax.Array | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 deterministic: bool = True, return_middle: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Args:
          x: ``[B, H, W, Cin]`` (noisy image, possibly with conditioning channels appended).
          t: ``[B]`` int or float timesteps.
          emb: optional ``[B, time_embed_dim]`` added to the timestep embedding.
          context: optional ``[B, Lc, Dc]`` tokens every attention block also attends to.
          context_mask: optional ``[B, Lc]`` bool validity of the context tokens.
          deterministic: disable dropout.
          return_middle: also return the middle block's output (the lowest-resolution
            features, ``[B, H / downsampling, W / downsampling, C]`` float32, downsampling =
            patch_size · 2^(levels − 1)), for a
            representation-alignment loss.
        Returns:
          ``[B, H, W, out_channels]`` float32, or ``(that, middle)`` with ``return_middle``.
        """
        self.check_input(x.shape[1], x.shape[2])
        blocks = res_blocks_per_level(self.num_res_blocks, len(self.channel_mult))
        dt = self.dtype
        temb = timestep_embedding(t, self.base_channels)
        temb = dense(self.time_embed_dim, name="time_fc1")(temb)
        temb = dense(self.time_embed_dim, name="time_fc2", names=("mlp", "embed"))(
            jax.nn.silu(temb))
        if emb is not None:
            if emb.shape != temb.shape:
                raise ValueError(f"extra embedding has shape {emb.shape}; expected "
                                 f"{temb.shape} (batch, time_embed_dim)")
            temb = temb + emb.astype(jnp.float32)

        def heads(ch):
            return max(1, ch // self.head_channels)

        def attention(h, name):
            return AttentionBlock(heads(h.shape[-1]), self.groups, dt, name=name)(
                h, context, context_mask)

        def res(ch, name, resample=None):
            return ResBlock(ch, self.dropout, resample, self.groups, dt, self.time_shift,
                            name=name)

        p = self.patch_size
        if self.full_res_channels:
            full = conv(self.full_res_channels, dtype=dt, name="full_res_in")(x.astype(dt))
        if p > 1:
            x = space_to_depth(x, p)
        h = _constrain(conv(self.base_channels * self.channel_mult[0], dtype=dt,
                            name="conv_in")(x.astype(dt)))
        skips = [h]
        ds = 1
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            ch = self.base_channels * mult
            for i in range(blocks[level]):
                h = res(ch, f"down_{level}_res_{i}")(h, temb, deterministic)
                if ds in self.attention_ds:
                    h = attention(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level != last:
                if self.resblock_updown:
                    h = res(ch, f"down_{level}_resample", "down")(h, temb, deterministic)
                else:
                    h = conv(ch, 3, 2, dtype=dt, name=f"down_{level}_resample")(h)
                ds *= 2
                skips.append(h)

        ch = h.shape[-1]
        h = res(ch, "mid_res_0")(h, temb, deterministic)
        if self.middle_attention:
            h = attention(h, "mid_attn")
        h = res(ch, "mid_res_1")(h, temb, deterministic)
        middle = h

        for level in reversed(range(len(self.channel_mult))):
            ch = self.base_channels * self.channel_mult[level]
            for i in range(blocks[level] + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(ch, f"up_{level}_res_{i}")(h, temb, deterministic)
                if ds in self.attention_ds:
                    h = attention(h, f"up_{level}_attn_{i}")
            if level != 0:
                if self.resblock_updown:
                    h = res(ch, f"up_{level}_resample", "up")(h, temb, deterministic)
                else:
                    h = conv(ch, dtype=dt, name=f"up_{level}_resample")(upsample_2x(h))
                ds //= 2

        h = jax.nn.silu(group_norm(h.shape[-1], self.groups, "norm_out")(h)).astype(dt)
        out = conv(self.out_channels * p * p, zero=True, dtype=dt, name="conv_out")(h)
        if p > 1:
            out = depth_to_space(out, p)
        if self.full_res_channels:
            c = self.full_res_channels
            f = depth_to_space(conv(c * p * p, dtype=dt, name="full_res_up")(h), p) + full
            for i in range(2):
                f = jax.nn.silu(group_norm(c, self.groups, f"full_res_norm_{i}")(f)).astype(dt)
                f = conv(c if i == 0 else self.out_channels, zero=i == 1, dtype=dt,
                         name=f"full_res_conv_{i}")(f)
            out = out + f
        out = out.astype(jnp.float32)
        return (out, middle.astype(jnp.float32)) if return_middle else out
