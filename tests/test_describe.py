"""describe: parameter counts and per-device bytes from eval_shape alone."""

import glob
import math
from pathlib import Path

import jax
import pytest

from unclip_jax.commands.describe import parse_mesh
from unclip_jax.core import config as config_lib
from unclip_jax.core import sharding
from unclip_jax.core.config import ExperimentConfig
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models.clip import CLIP, CLIPConfig, dummy_inputs
from unclip_jax.pipelines.describe import abstract_params, describe, per_device_param_elements

ROOT = Path(__file__).resolve().parent.parent

# Widths divisible by 8 so every big leaf splits evenly over an 8-way fsdp axis.
TINY = CLIPConfig(embed_dim=32, image_size=16, patch_size=8, vision_width=64, vision_layers=2,
                  vision_heads=4, vocab_size=64, context_length=8, text_width=64,
                  text_layers=2, text_heads=4)


def tiny_cfg(**mesh):
    return ExperimentConfig(name="tiny", model=TINY, task="clip",
                            data=config_lib.DataConfig(image_size=16, context_length=8),
                            mesh=MeshConfig(**mesh))


def real_params():
    inputs = dummy_inputs(TINY)
    return CLIP(TINY).init(jax.random.PRNGKey(0), inputs["image"], inputs["tokens"])["params"]


def test_param_count_matches_real_init():
    real = sum(x.size for x in jax.tree.leaves(sharding.strip_boxes(real_params())))
    assert describe(tiny_cfg(), (1, 1, 1))["params"] == real


def test_fsdp4_bytes_match_real_shards():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, model=1), jax.devices()[:4])
    rules = sharding.logical_rules("fsdp")
    boxed = abstract_params(tiny_cfg())
    _, shardings = sharding.abstract_with_shardings(boxed, mesh, rules)
    params = jax.device_put(sharding.strip_boxes(real_params()), shardings)
    real_local = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(params))
    total, local = per_device_param_elements(boxed, (1, 4, 1), "fsdp")
    assert local == real_local
    # Leaves sharded over fsdp hold exactly a quarter each.
    specs = jax.tree.leaves(nn_specs(boxed), is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))
    for leaf, spec in zip(jax.tree.leaves(params), specs):
        if "embed" in tuple(spec) or "conv_in" in tuple(spec):
            assert leaf.addressable_shards[0].data.size * 4 == leaf.size
    d = describe(tiny_cfg(), (1, 4, 1), preset="fsdp")
    assert d["params_bytes"] == 4 * real_local and d["opt_bytes"] == 8 * real_local


def nn_specs(boxed):
    import flax.linen as nn

    return nn.get_partition_spec(boxed)


def test_fsdp8_is_about_an_eighth():
    # Wider (still tiny) towers: replicated vectors (biases, norms) grow like the width, the
    # sharded matrices like its square, so a width of 256 puts them under 10%.
    import dataclasses

    wide = dataclasses.replace(tiny_cfg(), model=dataclasses.replace(
        TINY, vision_width=256, text_width=256))
    total, local = per_device_param_elements(abstract_params(wide), (1, 8, 1), "fsdp")
    assert local / (total / 8) <= 1.10
    d1, d8 = describe(tiny_cfg(), (1, 1, 1), preset="fsdp"), describe(tiny_cfg(), (1, 8, 1),
                                                                     preset="fsdp")
    assert d8["activation_bytes"] < d1["activation_bytes"]
    assert d1["ema_bytes"] == 0


def test_uneven_dims_round_up():
    # 3 over an axis of 2 → 2 per device; replicated dims untouched.
    from unclip_jax.pipelines.describe import shard_elements

    assert shard_elements((3, 5), ("fsdp", None), {"fsdp": 2}) == 10
    assert shard_elements((8, 6), ("fsdp", "model"), {"fsdp": 4, "model": 4}) == 4


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=4") == (2, 4, 1)
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        parse_mesh("pipe=2")


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "experiments/paper/*.py"))),
                         ids=lambda p: Path(p).stem)
def test_paper_configs_describe(path):
    cfg = config_lib.load_config(path)
    assert cfg.model.dtype == "bfloat16"
    d = describe(cfg, (4, 16, 2))
    assert d["params"] > 1e7 if cfg.task == "dvae" else d["params"] > 1e8
    assert 0 < d["params_bytes"] < 4 * d["params"]
    assert math.isfinite(d["activation_bytes"]) and d["activation_bytes"] > 0


def test_decoder_with_representation_alignment_describes():
    """A REPA decoder (``model.repa_weight``) describes before any CLIP exists: its head is
    counted with the embedding width standing in for the CLIP tower's, exactly
    repa_hidden · (C_mid + 1) + (repa_hidden + 1) · E parameters more than without it."""
    cfg = config_lib.load_config(ROOT / "experiments/shapes/decoder.py")
    base = describe(cfg, (1, 1, 1))["params"]
    repa = config_lib.load_config(ROOT / "experiments/shapes/decoder.py",
                                  ["model.repa_weight=0.5", "model.repa_hidden=16"])
    m, e = 64, repa.model.clip_dim          # the middle's channels (32 · 2), the stand-in width
    assert describe(repa, (1, 1, 1))["params"] - base == 16 * (m + 1) + 17 * e
