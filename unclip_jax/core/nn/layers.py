"""Small shared pieces: activations, dtype names, the LayerNorm and MLP used by every model.

Every parameter is created with logical axis names (see ``unclip_jax.core.sharding``) so the one
rules table shards all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.core import sharding

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` (one of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dtype(name: str | Dtype) -> Dtype:
    """A jnp dtype from a config string ("float32", "bfloat16", "float16") or a dtype."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}")
        return DTYPES[name]
    return name


def layer_norm(name: str | None = None, epsilon: float = 1e-5) -> nn.LayerNorm:
    """LayerNorm computed in float32 (whatever the compute dtype), scale/bias named ``norm``.

    ``epsilon`` defaults to PyTorch's 1e-5, so converted CLIP weights reproduce exactly.
    Callers cast the float32 output back to their compute dtype.
    """
    return nn.LayerNorm(
        epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class MlpBlock(nn.Module):
    """Two-layer MLP ``[B, L, D] -> [B, L, D]`` with hidden width ``mlp_dim``."""

    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        init = nn.initializers.xavier_uniform()
        h = nn.Dense(
            self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc",
            kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        h = activation(self.act)(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return nn.Dense(
            width, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
            kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h)


def conv_general_dilated(kernel_names: Sequence[str | None]) -> Callable[..., jax.Array]:
    """The ``lax.conv_general_dilated`` to give ``nn.Conv(conv_general_dilated=...)``.

    The kernel is first constrained to the logical names ``kernel_names`` (its FSDP shards
    gathered: see :func:`sharding.gathered_kernel_conv`, which runs every conv but one kind).
    A pointwise conv (1×1 kernel, stride 1, no dilation or padding, one feature group, in
    ``nn.Conv``'s channels-last layout) runs as the matmul over channels that it is: XLA:CPU
    runs that faster than the convolution (the dVAE's 1×1 2048 → 8192 logits layer at 32×32:
    285 → 180 ms, measured under load), and the sums are the same up to float32 round-off.
    """
    names = tuple(kernel_names)
    gathered = sharding.gathered_kernel_conv(names)

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None):
        spatial = rhs.ndim - 2
        channels_last = jax.lax.ConvDimensionNumbers(
            (0, spatial + 1, *range(1, spatial + 1)), (spatial + 1, spatial, *range(spatial)),
            (0, spatial + 1, *range(1, spatial + 1)))
        pointwise = (rhs.shape[:spatial] == (1,) * spatial
                     and all(s == 1 for s in window_strides)
                     and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
                     and (isinstance(padding, str) or all(p == (0, 0) for p in map(tuple,
                                                                                    padding)))
                     and feature_group_count == 1
                     and (dimension_numbers is None
                          or tuple(dimension_numbers) == tuple(channels_last)))
        if not pointwise:
            return gathered(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                            feature_group_count=feature_group_count, precision=precision)
        kernel = nn.with_logical_constraint(rhs, names).reshape(rhs.shape[spatial:])
        return jax.lax.dot_general(lhs, kernel, (((lhs.ndim - 1,), (0,)), ((), ())),
                                   precision=precision)

    return conv
