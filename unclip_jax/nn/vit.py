"""Vision transformer as in CLIP: patchify → class token → positions → ln_pre → blocks →
ln_post on the class token → linear projection.

Optional convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see
better"): instead of one ``p×p`` stride-``p`` patch projection, ``log2(p)`` 3×3 stride-2
convolutions (LayerNorm over channels, ReLU) and a 1×1 projection to the width. Each token
still covers one ``p×p`` patch, but its features come from overlapping small receptive fields,
which matters when a whole object spans only one or two patches (32 px shapes, patch 8).
"""

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
    stem_channels: tuple[int, ...] = ()   # () = linear patch embedding; else the conv stem

    def _conv_stem(self, x: jax.Array) -> jax.Array:
        p, chans = self.patch_size, tuple(self.stem_channels)
        if 2 ** len(chans) != p:
            raise ValueError(f"a conv stem of {len(chans)} stride-2 convolutions "
                             f"{list(chans)} gives patches of {2 ** len(chans)}, not "
                             f"patch_size {p}; give log2(patch_size) channel counts")
        for i, c in enumerate(chans):
            x = nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                        dtype=self.dtype, name=f"stem_conv{i}",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.he_normal(), (None, None, None, "mlp")))(x)
            x = jax.nn.relu(layer_norm(name=f"stem_norm{i}")(x).astype(self.dtype))
        return nn.Conv(self.width, (1, 1), use_bias=False, dtype=self.dtype, name="patch_embed",
                       kernel_init=nn.with_logical_partitioning(
                           nn.initializers.lecun_normal(), (None, None, "mlp", "embed")))(x)

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        if self.stem_channels:
            x = self._conv_stem(images.astype(self.dtype))
        else:
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
