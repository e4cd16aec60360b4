"""Pre-LN transformer: blocks of (LN → attention → residual, LN → MLP → residual).

Layers are either unrolled (params ``block_0 … block_{depth-1}``) or stacked with ``nn.scan``
(params ``blocks`` with a leading ``layers`` axis), and each block may be rematerialised with a
named policy. Both are config flags; the maths is identical.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.core.nn.attention import MultiHeadAttention, causal_mask
from unclip_jax.core.nn.layers import MlpBlock, layer_norm

Dtype = Any

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy called ``name`` (``"none"`` = no rematerialisation)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; accepted: {', '.join(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


class Block(nn.Module):
    """One pre-LN residual block ``[B, L, D] -> [B, L, D]``; returns ``(x, None)`` for scan."""

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask=None, context=None):
        names = ("batch", "length", "act_embed")
        h = layer_norm(name="ln_1")(x).astype(self.dtype)
        h = MultiHeadAttention(self.num_heads, dtype=self.dtype, decode=self.decode,
                               name="attn")(h, mask, context)
        x = nn.with_logical_constraint(x + h, names)
        h = layer_norm(name="ln_2")(x).astype(self.dtype)
        h = MlpBlock(self.mlp_dim, act=self.act, dtype=self.dtype, name="mlp")(h)
        return nn.with_logical_constraint(x + h, names), None


class Transformer(nn.Module):
    """A stack of ``depth`` pre-LN blocks ``[B, L, D] -> [B, L, D]`` (no final LN).

    Attributes:
      width, depth, num_heads, mlp_ratio: D, number of blocks, H, MLP hidden = D * ratio.
      act: MLP activation ("gelu", "quick_gelu", ...).
      causal: add a causal mask (ignored when ``decode``: the cache is causal by itself).
      scan_layers: stack the blocks with ``nn.scan`` (param axis ``layers``).
      remat: rematerialisation policy name (see ``REMAT_POLICIES``).
      decode: KV-cache decoding (see ``unclip_jax.core.nn.attention``).
    """

    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    act: str = "gelu"
    causal: bool = False
    dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 context: jax.Array | None = None) -> jax.Array:
        """``x`` ``[B, L, D]``; ``mask`` bool broadcastable to ``[B, H, L, Lk]`` (True = attend;
        combined with the causal mask); ``context`` ``[B, Lc, Dc]`` extra keys/values."""
        if x.shape[-1] != self.width:
            raise ValueError(f"input width {x.shape[-1]} != transformer width {self.width}")
        if self.causal and not self.decode:
            causal = causal_mask(x.shape[1])
            mask = causal if mask is None else jnp.logical_and(
                mask, _pad_keys(causal, mask) if mask.shape[-1] > x.shape[1] else causal)
        x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "act_embed"))

        block = Block
        policy = remat_policy(self.remat)
        if self.remat != "none":
            block = nn.remat(block, policy=policy, prevent_cse=not self.scan_layers)
        kw = dict(num_heads=self.num_heads, mlp_dim=int(self.width * self.mlp_ratio),
                  act=self.act, dtype=self.dtype, decode=self.decode)
        if self.scan_layers:
            stack = nn.scan(
                block, variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(name="blocks", **kw)(x, mask, context)
        else:
            for i in range(self.depth):
                x, _ = block(name=f"block_{i}", **kw)(x, mask, context)
        return x


def _pad_keys(causal: jax.Array, mask: jax.Array) -> jax.Array:
    """Extend a ``[1, 1, L, L]`` causal mask with visible context keys to match ``mask``."""
    extra = mask.shape[-1] - causal.shape[-1]
    return jnp.concatenate([causal, jnp.ones(causal.shape[:-1] + (extra,), jnp.bool_)], -1)
