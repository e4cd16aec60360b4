"""Vision transformer as in CLIP: patchify → class token → positions → ln_pre → blocks →
ln_post on the class token → linear projection.

Optional convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see
better"): instead of one ``p×p`` stride-``p`` patch projection, ``log2(p)`` 3×3 stride-2
convolutions (LayerNorm over channels, ReLU) and a 1×1 projection to the width. Each token
still covers one ``p×p`` patch, but its features come from overlapping small receptive fields,
which matters when a whole object spans only one or two patches (32 px shapes, patch 8).

Optional late colour (``colour_blocks = n``): the first ``depth - n`` blocks see a
colour-blind image (the luma, stretched per image to span [-1, 1], so that no intensity
level names a colour either); the chroma (RGB minus luma) gets its own patch projection,
added to the tokens before the last ``n`` blocks. Shape features are then computed without
colour and cannot be conditioned on it; colour is bound to them by the last ``n`` blocks.
Meant for compositional generalisation to unseen (colour, shape) pairs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.core.nn.layers import conv_general_dilated, layer_norm
from unclip_jax.core.nn.transformer import Transformer

Dtype = Any


# ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)


def _split_luma(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[B, H, W, 3]`` in [-1, 1] → (colour-blind ``[B, H, W, 1]``: the luma stretched per
    image to [-1, 1]; chroma ``[B, H, W, 3]``: the image minus its luma)."""
    x = images.astype(jnp.float32)
    luma = jnp.tensordot(x, jnp.asarray(_LUMA, jnp.float32), axes=[[-1], [0]])[..., None]
    lo = jnp.min(luma, axis=(1, 2, 3), keepdims=True)
    hi = jnp.max(luma, axis=(1, 2, 3), keepdims=True)
    blind = 2.0 * (luma - lo) / jnp.maximum(hi - lo, 1e-3) - 1.0
    return blind, x - luma


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
    colour_blocks: int = 0                # 0 = RGB from the start; n = only the last n blocks
                                          # see colour

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
        # The kernel is stored [.., mlp→model, embed→fsdp]: gather its fsdp shards before the
        # conv (XLA's partitioner misplaces examples otherwise), which as a 1×1 conv runs as a
        # matmul (layers.conv_general_dilated).
        return nn.Conv(self.width, (1, 1), use_bias=False, dtype=self.dtype, name="patch_embed",
                       kernel_init=nn.with_logical_partitioning(
                           nn.initializers.lecun_normal(), (None, None, "mlp", "embed")),
                       conv_general_dilated=conv_general_dilated((None, None, "mlp", None)))(x)

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        if self.colour_blocks:
            if not 0 < self.colour_blocks <= self.depth:
                raise ValueError(f"colour_blocks={self.colour_blocks} must be in [1, depth = "
                                 f"{self.depth}] (0 disables it)")
            images, chroma = _split_luma(images)
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
        early = self.depth - self.colour_blocks
        if early:
            x = Transformer(self.width, early, self.num_heads, self.mlp_ratio, self.act,
                            dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat,
                            name="transformer")(x)
        if self.colour_blocks:
            c = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                        dtype=self.dtype, name="chroma_embed",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.lecun_normal(), (None, None, None, "embed")))(
                                chroma.astype(self.dtype)).reshape(b, -1, self.width)
            x = x + jnp.concatenate([jnp.zeros((b, 1, self.width), x.dtype), c], axis=1)
            x = Transformer(self.width, self.depth - early, self.num_heads, self.mlp_ratio,
                            self.act, dtype=self.dtype, scan_layers=self.scan_layers,
                            remat=self.remat, name="transformer_late")(x)
        x = layer_norm(name="ln_post")(x)
        proj = self.param("proj", nn.with_logical_partitioning(
            nn.initializers.normal(scale), ("embed", None)), (self.width, self.output_dim))
        feat = jnp.dot(x[:, 0], proj, precision=jax.lax.Precision.HIGHEST)
        return x, feat
