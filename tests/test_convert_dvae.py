"""dVAE weight conversion from OpenAI's ``dall_e`` layout.

Plain tests (no torch): the round trip through the dall_e key layout, config inference (the
released model's shapes, read without allocating), the all-or-nothing error lists and the file
layouts. Parity tests (``make parity``): randomly initialised ``dall_e.Encoder``/``Decoder``
(torch) against our converted model on the same inputs, and the pixel maps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import dvae
from unclip_jax.pipelines.convert import dvae as convert_dvae
from unclip_jax.pipelines.convert.clip import ConversionError

# Two groups of two blocks: id_path convs appear in the encoder's second group and the
# decoder's first block (init width 4 -> 16), like the released model's.
SMALL = dvae.DVAEConfig(image_size=16, num_groups=2, blocks_per_group=2, encoder_width=8,
                        decoder_width=8, decoder_init_width=4, vocab_size=16)


def _random_params(cfg, seed=0):
    """Our params' tree (from ``jax.eval_shape``: no init to compile) filled with random
    float32 values, biases included."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in sorted(convert_dvae.expected_shapes(cfg).items()):
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = rng.normal(0, 0.3, shape).astype(np.float32)
    return params


@pytest.fixture(scope="module")
def small():
    params = _random_params(SMALL)
    return params, convert_dvae.to_state_dicts(params, SMALL)


def _paper_shapes():
    """The released dVAE's (encoder, decoder) key → shape, as zero-stride views (no memory)."""
    cfg = dvae.PRESETS["dalle"]
    want = convert_dvae.expected_shapes(cfg)
    out = ({}, {})
    for path, (key, _) in convert_dvae.spec_leaves(convert_dvae.param_spec(cfg)):
        shape = want[path]
        torch_shape = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
        part, _, theirs = key.partition(".")
        out[part == "decoder"][theirs] = np.broadcast_to(np.float32(0), torch_shape)
    return out


# ----------------------------------------------------------------------------- plain


def test_dall_e_key_layout(small):
    _, (enc, dec) = small
    assert enc["blocks.input.w"].shape == (8, 3, 7, 7)
    assert enc["blocks.group_1.block_1.res_path.conv_4.w"].shape == (8, 2, 1, 1)
    assert "blocks.group_1.block_1.id_path.w" not in enc          # 8 -> 8: identity
    assert enc["blocks.group_2.block_1.id_path.w"].shape == (16, 8, 1, 1)
    assert "blocks.group_2.block_2.id_path.w" not in enc
    assert enc["blocks.output.conv.w"].shape == (16, 16, 1, 1)
    assert dec["blocks.input.w"].shape == (4, 16, 1, 1)
    assert dec["blocks.group_1.block_1.id_path.w"].shape == (16, 4, 1, 1)
    assert dec["blocks.group_1.block_1.res_path.conv_1.w"].shape == (4, 4, 1, 1)
    assert dec["blocks.group_2.block_1.res_path.conv_4.w"].shape == (8, 2, 3, 3)
    assert dec["blocks.output.conv.w"].shape == (6, 8, 1, 1)


def test_round_trip_is_exact(small):
    params, (enc, dec) = small
    cfg, converted = convert_dvae.convert(enc, dec, image_size=16)
    assert cfg == SMALL
    flat_a = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(converted)[0])
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(leaf), flat_b[path], err_msg=str(path))


def test_infer_config_of_the_released_model():
    enc, dec = _paper_shapes()
    assert len(enc) == 2 + 2 * (4 * 2 * 4) + 2 * 3 + 2          # input, blocks, id paths, out
    assert convert_dvae.infer_config(enc, dec) == dvae.PRESETS["dalle"]
    assert convert_dvae.infer_config(enc, dec, image_size=128).image_size == 128
    assert convert_dvae.infer_config(enc, dec, beta_max=1.0).beta_max == 1.0
    with pytest.raises(TypeError, match="not_a_field"):
        convert_dvae.infer_config(enc, dec, not_a_field=1)


def test_errors_list_every_bad_key(small):
    _, (enc, dec) = small
    enc, dec = dict(enc), dict(dec)
    del enc["blocks.group_2.block_1.id_path.b"]
    del dec["blocks.group_1.block_2.res_path.conv_3.w"]
    enc["blocks.group_1.block_1.res_path.conv_5.w"] = np.zeros((8, 2, 1, 1), np.float32)
    dec["blocks.output.conv.b"] = np.zeros(5, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_dvae.convert(enc, dec, image_size=16)
    msg = str(e.value)
    for key in ("encoder.blocks.group_2.block_1.id_path.b",
                "decoder.blocks.group_1.block_2.res_path.conv_3.w",
                "encoder.blocks.group_1.block_1.res_path.conv_5.w",
                "decoder.blocks.output.conv.b"):
        assert key in msg
    assert "missing keys (2)" in msg and "unknown keys (1)" in msg
    assert "mis-shaped keys (1)" in msg


def test_mismatched_parts_are_refused(small):
    _, (enc, dec) = small
    other_vocab = dict(dec, **{"blocks.input.w": np.zeros((4, 32, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match="16 codes but the decoder takes 32"):
        convert_dvae.infer_config(enc, other_vocab)
    three_groups = {k.replace("group_2", "group_3"): v for k, v in dec.items()}
    with pytest.raises(ConversionError, match=r"decoder groups are not 1..N: found \[1, 3\]"):
        convert_dvae.infer_config(enc, three_groups)
    one_block = {k: v for k, v in dec.items() if ".block_2." not in k}
    with pytest.raises(ConversionError, match=r"encoder \(2 groups × 2 blocks\) and decoder "
                                              r"\(2 × 1\) differ"):
        convert_dvae.infer_config(enc, one_block)
    with pytest.raises(ConversionError, match="no 'blocks.group_N.block_M.' keys"):
        convert_dvae.infer_config({"visual.conv1.weight": np.zeros((1, 1, 1, 1))}, dec)
    gray = dict(enc, **{"blocks.input.w": np.zeros((8, 1, 7, 7), np.float32)})
    with pytest.raises(ConversionError, match="3 input channels and 6 output statistics"):
        convert_dvae.infer_config(gray, dec)


def test_file_layouts(tmp_path, small):
    _, (enc, dec) = small
    folder = tmp_path / "pair"
    folder.mkdir()
    np.savez(folder / "encoder.npz", **enc)
    np.savez(folder / "decoder.npz", **dec)
    combined = tmp_path / "dvae.npz"
    np.savez(combined, **{"encoder." + k: v for k, v in enc.items()},
             **{"decoder." + k: v for k, v in dec.items()})
    for loaded in (convert_dvae.load_state_dicts(folder),
                   convert_dvae.load_state_dicts(folder / "encoder.npz", folder / "decoder.npz"),
                   convert_dvae.load_state_dicts(combined)):
        assert set(loaded[0]) == set(enc) and set(loaded[1]) == set(dec)
        np.testing.assert_array_equal(loaded[1]["blocks.input.w"], dec["blocks.input.w"])
    np.savez(tmp_path / "encoder_only.npz", **enc)
    with pytest.raises(ConversionError, match=r"prefixes 'encoder.' and 'decoder.'.*keys "
                                              r"outside them: \['blocks.group_1"):
        convert_dvae.load_state_dicts(tmp_path / "encoder_only.npz")
    (folder / "decoder.npz").unlink()
    with pytest.raises(FileNotFoundError, match="no decoder file in"):
        convert_dvae.load_state_dicts(folder)
    with pytest.raises(FileNotFoundError, match="no checkpoint file at .*absent.npz"):
        convert_dvae.load_state_dicts(tmp_path / "absent.npz")


def test_load_state_dict_reads_safetensors(tmp_path, small):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, (enc, dec) = small
    safetensors_numpy.save_file(enc, str(tmp_path / "encoder.safetensors"))
    safetensors_numpy.save_file(dec, str(tmp_path / "decoder.safetensors"))
    loaded = convert_dvae.load_state_dicts(tmp_path)
    np.testing.assert_array_equal(loaded[0]["blocks.input.w"], enc["blocks.input.w"])


def test_workdir_loads_with_load_dvae(tmp_path, small):
    from unclip_jax.train.runs import load_dvae

    params, (enc, dec) = small
    np.savez(tmp_path / "encoder.npz", **enc)
    np.savez(tmp_path / "decoder.npz", **dec)
    out = convert_dvae.convert_checkpoint(tmp_path, tmp_path / "run", image_size=16)
    model, restored = load_dvae(out)
    assert model.config == SMALL
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    ours = dvae.DVAE(SMALL)
    logits = [np.asarray(ours.apply({"params": p}, images, method=dvae.DVAE.encode_logits))
              for p in (params, restored)]
    np.testing.assert_array_equal(*logits)
    z = jax.nn.softmax(jnp.asarray(logits[0]))
    stats = [np.asarray(ours.apply({"params": p}, z, method=dvae.DVAE.decode_stats))
             for p in (params, restored)]
    np.testing.assert_array_equal(*stats)


# ----------------------------------------------------------------------------- parity


def _dall_e():
    pytest.importorskip("torch")
    pytest.importorskip("attr")
    return pytest.importorskip("dall_e", reason="pip install --no-deps dall-e==0.1")


def _randomise(module, torch, seed):
    """dall_e initialises biases to zero: give every tensor a random part so all are used."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parity
@pytest.mark.parametrize("enc_hid,dec_init,dec_hid,blocks,vocab,size", [
    (64, 32, 64, 1, 512, (32, 32)),
    (64, 16, 80, 2, 600, (32, 48)),          # widths differ, two blocks, non-square images
])
def test_parity_with_dall_e(enc_hid, dec_init, dec_hid, blocks, vocab, size):
    dall_e = _dall_e()
    import torch

    enc_ref = _randomise(dall_e.Encoder(n_hid=enc_hid, n_blk_per_group=blocks,
                                        vocab_size=vocab), torch, 0)
    dec_ref = _randomise(dall_e.Decoder(n_init=dec_init, n_hid=dec_hid, n_blk_per_group=blocks,
                                        vocab_size=vocab), torch, 1)
    to_np = lambda sd: {k: v.detach().numpy() for k, v in sd.items()}  # noqa: E731
    cfg, params = convert_dvae.convert(to_np(enc_ref.state_dict()),
                                       to_np(dec_ref.state_dict()), image_size=size[0])
    assert (cfg.num_groups, cfg.blocks_per_group, cfg.encoder_width, cfg.decoder_width,
            cfg.decoder_init_width, cfg.vocab_size) == (4, blocks, enc_hid, dec_hid,
                                                        dec_init, vocab)
    model = dvae.DVAE(cfg)
    rng = np.random.default_rng(0)
    x01 = rng.uniform(0, 1, (2, *size, 3)).astype(np.float32)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa
    with torch.inference_mode():
        logits_ref = enc_ref(dall_e.map_pixels(nchw(x01))).numpy().transpose(0, 2, 3, 1)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(2 * x01 - 1),
                                    method=dvae.DVAE.encode_logits))
    assert logits.shape == logits_ref.shape == (2, size[0] // 8, size[1] // 8, vocab)
    print(f"dVAE parity: encoder logits max rel diff {_rel(logits, logits_ref):.2e}")
    assert _rel(logits, logits_ref) < 1e-4

    grid = logits.shape[1:3]
    soft = jax.nn.softmax(jnp.asarray(rng.normal(0, 3, (2, *grid, vocab)), jnp.float32))
    hard = jax.nn.one_hot(jnp.argmax(logits_ref, -1), vocab, dtype=jnp.float32)
    for name, z in (("one-hot", hard), ("soft", soft)):
        with torch.inference_mode():
            stats_ref = dec_ref(nchw(np.asarray(z))).numpy().transpose(0, 2, 3, 1)
        stats = np.asarray(model.apply({"params": params}, z, method=dvae.DVAE.decode_stats))
        assert stats.shape == stats_ref.shape == (2, *size, 6)
        print(f"dVAE parity: decoder ({name} codes) max rel diff {_rel(stats, stats_ref):.2e}")
        assert _rel(stats, stats_ref) < 1e-4
    # the whole reconstruction as dall_e's usage does it: unmap(sigmoid(stats[:, :3]))
    with torch.inference_mode():
        recon_ref = dall_e.unmap_pixels(torch.sigmoid(dec_ref(nchw(np.asarray(hard)))[:, :3]))
    recon = np.asarray(dvae.decode(model, params, jnp.argmax(jnp.asarray(logits_ref), -1)))
    np.testing.assert_allclose((recon + 1) / 2, recon_ref.numpy().transpose(0, 2, 3, 1),
                               atol=1e-5)


@pytest.mark.parity
def test_pixel_maps_match_dall_e():
    dall_e = _dall_e()
    import torch

    x = np.linspace(0, 1, 4 * 3 * 5 * 5, dtype=np.float32).reshape(4, 3, 5, 5)
    ref = dall_e.map_pixels(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(dvae.map_pixels(x, SMALL.eps)), ref, atol=1e-7)
    y = np.linspace(-0.2, 1.2, x.size, dtype=np.float32).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(dvae.unmap_pixels(y, SMALL.eps)),
                               dall_e.unmap_pixels(torch.from_numpy(y)).numpy(), atol=1e-7)


@pytest.mark.parity
def test_pickled_modules_get_the_export_hint(tmp_path):
    dall_e = _dall_e()
    import torch

    path = tmp_path / "encoder.pkl"
    torch.save(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), path)
    with pytest.raises(ConversionError, match=r"pickled modules.*state_dict\(\)"):
        convert_dvae.load_state_dicts(path, path)
