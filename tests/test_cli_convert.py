"""``unclip-jax convert``: synthetic state dicts (``.npz``, no torch) through the command line,
read back by the loaders of trained runs and compared with the converters' in-memory params;
every bad input exits 2 with a message naming it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.commands import cli
from unclip_jax.commands import convert as convert_cmd
from unclip_jax.models import dvae
from unclip_jax.models.clip import CLIP, CLIPConfig
from unclip_jax.pipelines.convert import clip as convert_clip
from unclip_jax.pipelines.convert import dvae as convert_dvae

CLIP_CFG = CLIPConfig(embed_dim=32, image_size=16, patch_size=8, vision_width=64,
                      vision_layers=1, vision_heads=1, vocab_size=50, context_length=8,
                      text_width=64, text_layers=1, text_heads=1, eos_id=49, pad_id=0)
DVAE_CFG = dvae.DVAEConfig(image_size=16, num_groups=2, blocks_per_group=1, encoder_width=8,
                           decoder_width=8, decoder_init_width=4, vocab_size=16)


def _random_tree(shapes: dict, seed: int) -> dict:
    """A params tree with the given ``{path: shape}``, random float32 leaves."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for path, shape in sorted(shapes.items()):
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = rng.normal(0, 0.2, shape).astype(np.float32)
    return tree


@pytest.fixture(scope="module")
def clip_sd():
    params = _random_tree(convert_clip.expected_shapes(CLIP_CFG), 0)
    params["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
    return convert_clip.to_state_dict(params, CLIP_CFG)


@pytest.fixture(scope="module")
def dvae_sds():
    return convert_dvae.to_state_dicts(_random_tree(convert_dvae.expected_shapes(DVAE_CFG), 1),
                                       DVAE_CFG)


def _main(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_clip_through_the_cli_loads_with_load_clip(tmp_path, clip_sd, capsys):
    from unclip_jax.train.runs import load_clip

    np.savez(tmp_path / "clip.npz", **clip_sd)
    rc, out, err = _main(["convert", "clip", tmp_path / "clip.npz", "--out", tmp_path / "run"],
                         capsys)
    assert rc == 0, err
    assert "wrote" in out
    cfg, params = convert_clip.convert(clip_sd)             # the in-memory conversion
    loaded = load_clip(tmp_path / "run")
    restored, loaded_cfg = loaded.params, loaded.config
    assert loaded_cfg == cfg == CLIP_CFG
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    tokens = jnp.asarray([[1, 5, 7, 49, 0, 0, 0, 0], [3, 49, 0, 0, 0, 0, 0, 0]], jnp.int32)
    for method in ("encode_image", "encode_text"):
        arg = images if method == "encode_image" else tokens
        a, b = (np.asarray(CLIP(cfg).apply({"params": p}, arg, method=getattr(CLIP, method)))
                for p in (params, restored))
        np.testing.assert_array_equal(a, b, err_msg=method)
    rc, _, err = _main(["convert", "clip", tmp_path / "clip.npz", "--out", tmp_path / "gelu",
                        "--act", "gelu", "--no-fold-normalization"], capsys)
    assert rc == 0, err
    gelu = load_clip(tmp_path / "gelu")
    unfolded, gelu_cfg = gelu.params, gelu.config
    assert gelu_cfg.act == "gelu"
    np.testing.assert_array_equal(np.asarray(unfolded["visual"]["patch_embed"]["kernel"]),
                                  clip_sd["visual.conv1.weight"].transpose(2, 3, 1, 0))


def test_dvae_through_the_cli_loads_with_load_dvae(tmp_path, dvae_sds, capsys):
    from unclip_jax.train.runs import load_dvae

    enc, dec = dvae_sds
    np.savez(tmp_path / "enc.npz", **enc)
    np.savez(tmp_path / "dec.npz", **dec)
    rc, out, err = _main(["convert", "dvae", tmp_path / "enc.npz", "--decoder",
                          tmp_path / "dec.npz", "--image-size", 16, "--out", tmp_path / "run",
                          "--option", "beta_max=2.5"], capsys)
    assert rc == 0, err
    cfg, params = convert_dvae.convert(enc, dec, image_size=16, beta_max=2.5)
    model, restored = load_dvae(tmp_path / "run")
    assert model.config == cfg and cfg.beta_max == 2.5
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    logits = [np.asarray(model.apply({"params": p}, images, method=dvae.DVAE.encode_logits))
              for p in (params, restored)]
    np.testing.assert_array_equal(*logits)
    z = jax.nn.softmax(jnp.asarray(logits[0]))
    stats = [np.asarray(model.apply({"params": p}, z, method=dvae.DVAE.decode_stats))
             for p in (params, restored)]
    np.testing.assert_array_equal(*stats)


def test_missing_source_exits_2(tmp_path, capsys):
    rc, _, err = _main(["convert", "dvae", tmp_path / "nowhere", "--out", tmp_path / "run"],
                       capsys)
    assert rc == 2
    assert "dvae source" in err and "nowhere" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_unknown_kind_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "vqgan", str(tmp_path), "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "invalid choice: 'vqgan'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model kind 'vqgan'; accepted: clip, dvae, "
                                         "karlo"):
        convert_cmd.convert("vqgan", tmp_path, tmp_path / "run")


def test_absent_converter_module_is_reported(monkeypatch):
    monkeypatch.setitem(convert_cmd.CONVERTERS, "karlo",
                        "unclip_jax.pipelines.convert.not_a_module:convert_checkpoint")
    with pytest.raises(ValueError, match=r"the karlo converter \(unclip_jax.pipelines.convert."
                                         r"not_a_module\) is not available"):
        convert_cmd.resolve("karlo")


def test_bad_keys_exit_2_listing_them(tmp_path, clip_sd, capsys):
    bad = dict(clip_sd)
    del bad["visual.ln_post.bias"]
    bad["visual.extra_head.weight"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    rc, _, err = _main(["convert", "clip", tmp_path / "bad.npz", "--out", tmp_path / "run"],
                       capsys)
    assert rc == 2
    assert "missing keys (1)" in err and "visual.ln_post.bias" in err
    assert "unknown keys (1)" in err and "visual.extra_head.weight" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_option_and_output_errors(tmp_path, dvae_sds, capsys):
    enc, dec = dvae_sds
    np.savez(tmp_path / "encoder.npz", **enc)
    np.savez(tmp_path / "decoder.npz", **dec)
    base = ["convert", "dvae", tmp_path, "--image-size", 16, "--out", tmp_path / "run"]
    rc, _, err = _main(base + ["--option", "nonsense"], capsys)
    assert rc == 2 and "--option 'nonsense' must be KEY=VALUE" in err
    rc, _, err = _main(base + ["--option", "not_a_field=1"], capsys)
    assert rc == 2 and "unknown DVAEConfig fields: ['not_a_field']" in err
    rc, _, err = _main(base, capsys)
    assert rc == 0, err
    rc, _, err = _main(base, capsys)
    assert rc == 2 and "already holds checkpoints" in err


def test_parse_option_values():
    assert convert_cmd.parse_option("context_length=77") == ("context_length", 77)
    assert convert_cmd.parse_option("x=1.5") == ("x", 1.5)
    assert convert_cmd.parse_option("flag=true") == ("flag", True)
    assert convert_cmd.parse_option("image_mean=null") == ("image_mean", None)
    assert convert_cmd.parse_option("components=prior,decoder") == (
        "components", ["prior", "decoder"])
    assert convert_cmd.parse_option("act=gelu") == ("act", "gelu")
    with pytest.raises(ValueError, match="KEY a Python name"):
        convert_cmd.parse_option("bad key=1")
