"""Vision transformer as in CLIP: patchify → class token → positions → ln_pre → blocks →
ln_post on the class token → linear projection."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.nn.layers import layer_norm
from unclip_jax.nn.transformer import Transformer

Dtype = Any


class VisionTransformer(nn.Module):
    """``[B, H, W, 3]`` images in [-1, 1] → ``[B, output_dim]`` float32 features (not normalised).

    Also returns the token states ``[B, 1 + (H/p)(W/p), width]`` after ``ln_post`` (float32).
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        x = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            dtype=self.dtype, name="patch_embed",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")))(
                    images.astype(self.dtype))
        x = x.reshape(b, -1, self.width)
        scale = self.width ** -0.5
        cls = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(scale), ("embed",)), (self.width,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], 1)
        pos = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(scale), ("length", "embed")), x.shape[1:])
        x = x + pos.astype(x.dtype)
        x = layer_norm(name="ln_pre")(x)
        x = Transformer(self.width, self.depth, self.num_heads, self.mlp_ratio, self.act,
                        dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat,
                        name="transformer")(x)
        x = layer_norm(name="ln_post")(x)
        proj = self.param("proj", nn.with_logical_partitioning(
            nn.initializers.normal(scale), ("embed", None)), (self.width, self.output_dim))
        feat = jnp.dot(x[:, 0], proj, precision=jax.lax.Precision.HIGHEST)
        return x, feat
