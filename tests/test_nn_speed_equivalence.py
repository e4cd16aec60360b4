"""Ops rewritten for XLA:CPU speed equal the straightforward formulation they replace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core.nn.unet import GroupNorm


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 64), 32), ((1, 16, 8, 96), 32),
                                          ((3, 4, 4, 32), 32), ((2, 5, 6, 12), 4),
                                          ((2, 7, 24), 8)])
def test_group_norm_matches_flax(shape, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape) * 3.0 + 1.5, jnp.float32)
    c = shape[-1]
    params = {"scale": jnp.asarray(1 + 0.2 * rng.normal(size=c), jnp.float32),
              "bias": jnp.asarray(0.2 * rng.normal(size=c), jnp.float32)}
    ours = GroupNorm(groups, epsilon=1e-5).apply({"params": params}, x)
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5).apply({"params": params}, x)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_group_norm_params_match_flax():
    x = jnp.ones((1, 4, 4, 64), jnp.bfloat16)
    ours = nn.meta.unbox(GroupNorm(32).init(jax.random.key(0), x))
    ref = nn.GroupNorm(num_groups=32).init(jax.random.key(0), x.astype(jnp.float32))
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    assert GroupNorm(32).apply(ours, x).dtype == jnp.float32


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="not divisible"):
        GroupNorm(32).init(jax.random.key(0), jnp.ones((1, 2, 2, 48)))


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, "SAME"), (1, 1, "VALID"),
                                                   (1, 2, "SAME"), (3, 1, "SAME")])
def test_conv_general_dilated_matches_lax_conv(kernel, stride, padding):
    from unclip_jax.core.nn.layers import conv_general_dilated

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 16)), jnp.float32)
    make = lambda fn: nn.Conv(24, (kernel, kernel), strides=stride, padding=padding,  # noqa
                              conv_general_dilated=fn)
    params = make(None).init(jax.random.key(0), x)
    ours = make(conv_general_dilated((None, None, None, None))).apply(params, x)
    ref = make(None).apply(params, x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)
