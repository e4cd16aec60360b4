"""Config files, type-checked overrides, and the mesh built from config."""

import dataclasses
import json

import pytest
from hypothesis import given, settings, strategies as st

from unclip_jax.core import config as config_lib
from unclip_jax.core import sharding


@dataclasses.dataclass(frozen=True)
class ToyModel:
    width: int = 8
    dropout: float = 0.1
    causal: bool = True
    act: str = "gelu"
    mults: tuple[int, ...] = (1, 2)
    extra: int | None = None


def base():
    return config_lib.ExperimentConfig(name="toy", model=ToyModel())


def test_overrides_are_parsed_to_field_types():
    cfg = config_lib.apply_overrides(base(), [
        "model.width=32", "model.dropout=0.25", "model.causal=false", "model.act=quick_gelu",
        "model.mults=1,2,4", "model.extra=7", "train.steps=10", "mesh.fsdp=2",
        "optim.learning_rate=3e-4"])
    assert cfg.model == ToyModel(32, 0.25, False, "quick_gelu", (1, 2, 4), 7)
    assert cfg.train.steps == 10 and cfg.mesh.fsdp == 2 and cfg.optim.learning_rate == 3e-4
    assert config_lib.apply_overrides(cfg, ["model.extra=none"]).model.extra is None


def test_unknown_key_names_valid_keys():
    with pytest.raises(KeyError, match=r"unknown config key 'train.stpes'.*valid keys here: "
                                       r".*batch_size.*steps"):
        config_lib.apply_overrides(base(), ["train.stpes=3"])
    with pytest.raises(KeyError, match="unknown config key 'modle.width'.*model"):
        config_lib.apply_overrides(base(), ["modle.width=3"])


def test_wrong_type_is_an_error():
    with pytest.raises(ValueError, match="'train.steps' expects an int, got 'ten'"):
        config_lib.apply_overrides(base(), ["train.steps=ten"])
    with pytest.raises(ValueError, match="'model.causal' expects a bool"):
        config_lib.apply_overrides(base(), ["model.causal=maybe"])
    with pytest.raises(ValueError, match="'train' is a group of settings"):
        config_lib.apply_overrides(base(), ["train=3"])
    with pytest.raises(ValueError, match="must look like key.sub=value"):
        config_lib.apply_overrides(base(), ["train.steps"])


def test_load_config_file_and_json(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("from unclip_jax.core.config import ExperimentConfig\n"
                    "def get_config():\n    return ExperimentConfig(name='x', model=None)\n")
    cfg = config_lib.load_config(path, ["train.batch_size=16"])
    assert cfg.name == "x" and cfg.train.batch_size == 16
    assert json.loads(config_lib.to_json(cfg))["train"]["batch_size"] == 16
    assert config_lib.flat_items(cfg)["train.batch_size"] == 16
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config_lib.load_config(tmp_path / "missing.py")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_override_parser_never_crashes_unexpectedly(text):
    """Any string is either applied or rejected with KeyError/ValueError naming the problem."""
    try:
        config_lib.apply_overrides(base(), [text])
    except (KeyError, ValueError):
        pass


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape(sharding.MeshConfig(data=-1, fsdp=2, model=2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(sharding.MeshConfig(), 8) == (8, 1, 1)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.mesh_shape(sharding.MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="8 devices cannot be split"):
        sharding.mesh_shape(sharding.MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="needs 16 devices, but 8 are available"):
        sharding.mesh_shape(sharding.MeshConfig(data=4, fsdp=2, model=2), 8)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, model=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    with pytest.raises(ValueError, match="unknown sharding preset 'zero3'"):
        sharding.logical_rules("zero3")
    dp = dict(sharding.logical_rules("dp"))
    assert dp["embed"] is None and dp["batch"] == ("data", "fsdp")


def test_from_dict_inverts_to_dict_for_every_model_config():
    """``config.from_dict(to_dict(cfg)) == cfg`` for the shipped configs of every family (the
    run loader's inverse), tuples included; a config.json from an older version (unknown field,
    a group without ``__type__``) still loads."""
    from unclip_jax.train import runs

    for path in ("clip", "prior", "prior_ar", "decoder", "upsampler", "dvae", "dalle"):
        cfg = config_lib.load_config(f"experiments/shapes/{path}.py")
        back = config_lib.from_dict(json.loads(config_lib.to_json(cfg)), runs.MODEL_CONFIGS)
        assert back == cfg, path
    d = json.loads(config_lib.to_json(base()))
    d["train"]["retired_setting"] = 3
    d["optim"].pop("__type__")
    assert config_lib.from_dict(d, {"ToyModel": ToyModel}) == base()
    with pytest.raises(ValueError, match="unknown config type 'NoSuchConfig'"):
        config_lib.from_dict({"__type__": "NoSuchConfig"})


def test_renamed_config_key_keeps_working_with_a_deprecation():
    """The prior's embedding cache is ``embeddings_dir`` as everywhere else; the old spelling
    ``cache_dir`` still works on the command line and in saved configs, with a warning."""
    from unclip_jax.train import runs
    from unclip_jax.models.prior import PriorConfig

    cfg = config_lib.load_config("experiments/shapes/prior.py")
    with pytest.warns(DeprecationWarning, match="'model.cache_dir' is deprecated.*"
                                                "'embeddings_dir'"):
        old = config_lib.apply_overrides(cfg, ["model.cache_dir=/x/emb"])
    assert old.model.embeddings_dir == "/x/emb"
    d = config_lib.to_dict(cfg.model)
    d["cache_dir"] = d.pop("embeddings_dir")
    assert config_lib.from_dict(d, runs.MODEL_CONFIGS) == cfg.model
    assert isinstance(config_lib.from_dict(d, runs.MODEL_CONFIGS), PriorConfig)
