"""The one multi-head attention of the package, with masks, external context and a KV cache.

Every model uses it: CLIP's towers, the DALL·E transformer, the unCLIP priors, and the decoder
U-Net's attention blocks (which attend to extra *context* tokens: the projected CLIP embedding
and the caption-encoder states). Logits and softmax are always float32; the projections and
the probability-weighted sum run in the compute ``dtype``.

Autoregressive decoding: build the module with ``decode=True`` and ``init`` it on an input of
the *maximum* length; that creates zero ``cache`` variables (keys/values ``[B, Lmax, H, Dh]``
and an index). Each later ``apply(..., mutable=["cache"])`` on a chunk ``[B, n, D]`` (one token,
or a prompt prefill) writes its keys/values at the index and attends causally to everything
written so far. Context keys/values, if given, are recomputed per call and always visible.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def causal_mask(length: int) -> jax.Array:
    """``[1, 1, L, L]`` bool: query i may attend to keys j <= i."""
    return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def padding_mask(valid: jax.Array) -> jax.Array:
    """``[B, 1, 1, L]`` bool key mask from ``valid`` ``[B, L]`` (True = a real token)."""
    return valid.astype(jnp.bool_)[:, None, None, :]


def _and(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    if a is None:
        return b
    if b is None:
        return a
    return jnp.logical_and(a, b)


class HeadsDense(nn.Module):
    """The projections around attention, kernels named ``(embed, heads, kv)``.

    ``split=True``: ``[B, L, D] -> [B, L, H, Dh]``; ``split=False``: ``[B, L, H, Dh] ->
    [B, L, out_features]``. Xavier-uniform init over the flattened (D, H·Dh) fans. (Written
    with ``self.param`` rather than ``nn.DenseGeneral``, whose flattened-shape init clashes
    with logical sharding constraints at init time.)
    """

    num_heads: int
    head_dim: int
    split: bool = True
    out_features: int | None = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads = (self.num_heads, self.head_dim)
        if self.split:
            shape, names, bias_shape = (x.shape[-1], *heads), ("embed", "heads", "kv"), heads
            fans, eq = dict(in_axis=0, out_axis=(1, 2)), "...d,dhk->...hk"
        else:
            width = self.out_features
            shape, names, bias_shape = (*heads, width), ("heads", "kv", "embed"), (width,)
            fans, eq = dict(in_axis=(0, 1), out_axis=2), "...hk,hkd->...d"
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", **fans)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, names), shape,
                            self.param_dtype)
        y = jnp.einsum(eq, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, names[1:] if self.split else names[2:]), bias_shape,
                self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention ``[B, L, D] -> [B, L, D]``.

    Attributes:
      num_heads: H.
      head_dim: Dh per head (default ``D // H``).
      dtype: compute dtype of the projections (logits/softmax are float32 regardless).
      param_dtype: parameter dtype (float32).
      decode: use and update the ``cache`` collection (see module docstring).
    """

    num_heads: int
    head_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    decode: bool = False

    def _proj(self, name: str, head_dim: int) -> HeadsDense:
        return HeadsDense(self.num_heads, head_dim, split=True, use_bias=self.use_bias,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 context: jax.Array | None = None) -> jax.Array:
        """Attend from ``x`` to itself (and to ``context``).

        Args:
          x: ``[B, L, D]`` queries and self keys/values.
          mask: bool, broadcastable to ``[B, H, L, Lk]``; True = may attend. ``Lk`` is ``L``
            (self keys only; context keys are then all visible) or ``L + Lc`` (self keys
            first, then context keys). In decode mode ``Lk`` is ``Lmax`` (or ``Lmax + Lc``),
            and the mask is combined with the cache's causal validity.
          context: optional ``[B, Lc, Dc]`` external tokens; their keys/values (own
            projections) are concatenated after the self keys/values.
        Returns:
          ``[B, L, D]`` in the compute dtype.
        """
        width = x.shape[-1]
        head_dim = self.head_dim or width // self.num_heads
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}; "
                             "set head_dim explicitly")
        x = x.astype(self.dtype)
        q = self._proj("query", head_dim)(x)
        k = self._proj("key", head_dim)(x)
        v = self._proj("value", head_dim)(x)
        names = ("batch", "length", "act_heads", "kv")
        q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))

        if self.decode:
            k, v, cache_mask = self._update_cache(k, v)
            if cache_mask is not None:
                if mask is not None and mask.shape[-1] != k.shape[1]:
                    cache_mask = _extend(cache_mask, mask.shape[-1])
                mask = _and(mask, cache_mask)

        if context is not None:
            context = context.astype(self.dtype)
            ck = self._proj("context_key", head_dim)(context)
            cv = self._proj("context_value", head_dim)(context)
            n_self = k.shape[1]
            k = jnp.concatenate([k, ck], axis=1)
            v = jnp.concatenate([v, cv], axis=1)
            if mask is not None and mask.shape[-1] == n_self:
                mask = _extend(mask, k.shape[1])

        if mask is not None and mask.shape[-1] not in (1, k.shape[1]):
            raise ValueError(f"mask key axis has {mask.shape[-1]} entries; accepted: "
                             f"{k.shape[1] - (0 if context is None else context.shape[1])} "
                             f"(self keys) or {k.shape[1]} (self + context keys)")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits.astype(jnp.float32) * (head_dim ** -0.5)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        out = HeadsDense(self.num_heads, head_dim, split=False, out_features=width,
                         use_bias=self.use_bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="out")(out)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))

    def _update_cache(self, k: jax.Array, v: jax.Array):
        """Write the chunk's keys/values into the cache; return full k/v and a validity mask.

        On the first (initialising) call the cache is created with the chunk's length as
        ``Lmax`` and the plain keys/values are returned with no extra mask.
        """
        initialised = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:
            return k, v, None
        n, max_len = k.shape[1], cached_k.value.shape[1]
        if k.shape[0] != cached_k.value.shape[0] or n > max_len:
            raise ValueError(f"decode chunk {k.shape[:2]} does not fit the cache "
                             f"{cached_k.value.shape[:2]} (batch, max length)")
        i = index.value
        k = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype),
                                         (0, i, 0, 0))
        v = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype),
                                         (0, i, 0, 0))
        cached_k.value, cached_v.value, index.value = k, v, i + n
        # Query t of the chunk sits at position i + t and sees keys at positions <= i + t.
        valid = jnp.arange(max_len)[None, :] <= (i + jnp.arange(n))[:, None]
        return k, v, valid[None, None]


def _extend(mask: jax.Array, total: int) -> jax.Array:
    """Pad a mask's key axis with True (visible) up to ``total`` keys."""
    extra = total - mask.shape[-1]
    pad = jnp.ones(mask.shape[:-1] + (extra,), jnp.bool_)
    return jnp.concatenate([mask.astype(jnp.bool_), pad], axis=-1)
