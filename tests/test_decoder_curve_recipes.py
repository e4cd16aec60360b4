"""The quality-vs-compute curve's recipes (``experiments/shapes/decoder_curve.py``, issue 20):
every recipe is a decoder config the decoder accepts, and a recipe costed as another
(``SAME_COST``: its x on the curve is that recipe's benched step) trains the same network on
the same batch, so the borrowed cost is the cost of its own step."""

import dataclasses
import functools
import importlib.util
from pathlib import Path

import jax
import pytest

from unclip_jax.core import config as config_lib
from unclip_jax.models import decoder as D

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("decoder_curve",
                                               ROOT / "experiments/shapes/decoder_curve.py")
CURVE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(CURVE)

# costed as another although the network differs by a little: no learned variance (3 output
# channels fewer) and the CLIP MLP (+64·256·2 multiply-adds an example, 0.04 % of the step)
SMALL_DIFFERENCE = {"p2ln_cls_b64_lr3e3_tdrop02_nolv", "p2ln_cls_b64_lr3e3_tdrop02_snr2_cmlp256",
                    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15_tok8"}
EMB = Path("runs/demo").absolute() / "embeddings"     # what overrides() puts in {emb}
CONFIG = config_lib.load_config(ROOT / "experiments/shapes/decoder.py")   # no overrides


def recipe(name: str):
    """The recipe's experiment config, and its decoder config with the values the training
    task sets from the data, the tokenizer and the CLIP (here: the config's own)."""
    cfg = config_lib.load_config(ROOT / "experiments/shapes/decoder.py",
                                 CURVE.overrides(name, Path("runs/demo"), 100, 0))
    model = dataclasses.replace(cfg.model, image_size=cfg.data.image_size,
                                context_length=cfg.data.context_length,
                                vocab_size=cfg.data.vocab_size,
                                repa_dim=64 if cfg.model.repa_weight > 0 else 0)
    return cfg, model


@functools.lru_cache(maxsize=None)
def network(model) -> dict:
    """The decoder's parameter shapes (abstract: nothing is computed), less the caption's class
    embedding (``text_class_emb``: one dense layer; benched at the same step, 0.120 s against
    0.124 s, so its recipes are costed as the ones without it)."""
    boxed = jax.eval_shape(lambda: D.init_decoder(model, jax.random.key(0)))
    shapes = jax.tree.map(lambda a: a.shape, boxed["params"])
    return {k: v for k, v in shapes.items() if k != "text_to_emb"}


@pytest.mark.parametrize("name", sorted(CURVE.RECIPES))
def test_every_recipe_is_a_config_the_decoder_accepts(name):
    cfg, model = recipe(name)
    D.check_decoder_config(model)
    assert (cfg.train.steps, cfg.train.seed) == (100, 0)
    last = {o.split("=", 1)[0]: o for o in CURVE.RECIPES[name]}   # a later setting wins
    for key, override in last.items():              # each of the recipe's settings holds
        alone = config_lib.apply_overrides(CONFIG, [override.format(emb=EMB)])
        path = key.split(".")
        assert (functools.reduce(getattr, path, cfg) ==
                functools.reduce(getattr, path, alone)), override


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown recipe 'p2ln_typo'; known: baseline, "):
        CURVE.overrides("p2ln_typo", Path("runs/demo"), 100, 0)


@pytest.mark.parametrize("name,costed_as", sorted(CURVE.SAME_COST.items()))
def test_a_recipe_costed_as_another_trains_the_same_network_on_the_same_batch(name, costed_as):
    assert costed_as in CURVE.RECIPES
    cfg, model = recipe(name)
    ref_cfg, ref_model = recipe(costed_as)
    assert cfg.train.batch_size == ref_cfg.train.batch_size
    assert (model.image_size, model.patch_size) == (ref_model.image_size, ref_model.patch_size)
    if name not in SMALL_DIFFERENCE:
        assert network(model) == network(ref_model)


def test_the_same_network_check_can_fail():
    """A recipe that changes the network (128 channels at 4 px) is not the demo's network."""
    _, wide = recipe("p2ln_cls_b64_lr3e3_tdrop02_snr2_m124")
    _, demo = recipe("p2ln_cls_b64_lr3e3_tdrop02_snr2")
    assert network(wide) != network(demo)


@pytest.mark.parametrize("name", sorted(n for n in CURVE.RECIPES
                                        if "optim.optimizer=muon" in CURVE.RECIPES[n]))
def test_muon_recipes_keep_existing_modules_on_adamw(name):
    """The modules a Muon recipe keeps on AdamW exist in its decoder (a misspelt name fails),
    and every other dense or conv kernel is Muon's."""
    from unclip_jax.train import optim

    cfg, model = recipe(name)
    params = jax.eval_shape(lambda: D.init_decoder(model, jax.random.key(0)))["params"]
    jax.eval_shape(optim.make_optimizer(cfg.optim, 10).init, params)   # a misspelt one raises
    groups = jax.tree.leaves(optim.muon_labels(params, cfg.optim.muon_adamw_modules))
    assert groups.count("muon") > 50 and set(cfg.optim.muon_adamw_modules) == {"conv_in",
                                                                                "conv_out"}
