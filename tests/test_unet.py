"""The ADM/GLIDE U-Net: shapes, zero-initialised outputs, context attention, logical names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core import sharding
from unclip_jax.core.nn.unet import UNet, timestep_embedding

NET = UNet(out_channels=6, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
           attention_ds=(2,), head_channels=8, resblock_updown=True)
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
T = jnp.array([3, 700])
CTX = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5)), jnp.float32)


def random_params(module, *args, seed=0, **kw):
    """Random (non-zero) params of the right structure without compiling an init."""
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kw))
    rng = np.random.default_rng(seed)
    plain = sharding.strip_boxes(boxed)["params"]
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(
            (1.0 if str(path[-1]) == "['scale']" else 0.0)
            + 0.2 * rng.normal(size=s.shape), jnp.float32), plain), boxed


@pytest.fixture(scope="module")
def params():
    return random_params(NET, X, T, context=CTX)


@pytest.fixture(scope="module")
def apply():
    return jax.jit(lambda p, x, t, ctx: NET.apply({"params": p}, x, t, context=ctx))


def test_timestep_embedding():
    e = timestep_embedding(jnp.array([0, 10]), 8)
    assert e.shape == (2, 8)
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-6)


def test_shape_and_context_attended(params, apply):
    p, _ = params
    out = apply(p, X, T, CTX)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    out2 = apply(p, X, T, CTX + 1.0)
    assert float(jnp.max(jnp.abs(out - out2))) > 1e-4      # the context tokens are attended


def test_zero_initialised_output_and_logical_names():
    boxed = jax.eval_shape(lambda: NET.init(jax.random.PRNGKey(0), X, T))["params"]
    kernel = boxed["conv_in"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned)
    assert kernel.names == (None, None, "conv_in", "conv_out")
    assert "gate" in boxed["down_1_attn_0"]
    # Real init: final conv and the residual branches' second convs start at zero.
    params = jax.jit(NET.init)(jax.random.PRNGKey(0), X, T)["params"]
    assert float(jnp.abs(params["conv_out"]["kernel"].value).max()) == 0.0
    assert float(jnp.abs(params["down_0_res_0"]["conv_2"]["kernel"].value).max()) == 0.0


def test_input_not_divisible_is_an_error(params):
    p, _ = params
    with pytest.raises(ValueError, match="not divisible by its downsampling factor 2"):
        jax.eval_shape(lambda: NET.apply({"params": p}, jnp.zeros((1, 9, 9, 3)), T[:1]))


def test_plain_updown_variant_shapes():
    net = UNet(out_channels=3, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
               attention_ds=(), middle_attention=False, resblock_updown=False)
    out = jax.eval_shape(lambda: net.init_with_output(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 12, 16, 5)),
                                                      jnp.zeros((1,)))[0])
    assert out.shape == (1, 12, 16, 3)
