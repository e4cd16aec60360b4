"""Building blocks shared by every model: one attention, the transformer, the ViT."""

from unclip_jax.core.nn.attention import HeadsDense, MultiHeadAttention, causal_mask, padding_mask
from unclip_jax.core.nn.layers import MlpBlock, activation, layer_norm, quick_gelu
from unclip_jax.core.nn.transformer import REMAT_POLICIES, Block, Transformer, remat_policy
from unclip_jax.core.nn.vit import VisionTransformer

__all__ = [
    "HeadsDense", "MultiHeadAttention", "causal_mask", "padding_mask", "MlpBlock", "activation",
    "layer_norm", "quick_gelu", "REMAT_POLICIES", "Block", "Transformer", "remat_policy",
    "VisionTransformer",
]
