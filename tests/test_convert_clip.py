"""CLIP weight conversion and the CLIP BPE tokenizer.

Plain tests (no torch): the OpenAI-layout round trip, the folded image normalisation, the
error lists, the workdir that ``runs.load_clip`` reads, and the tokenizer's mechanics on a tiny
vocabulary. Parity tests (``make parity``): a randomly initialised Hugging Face
``transformers`` CLIP (torch) against our converted model, and our tokenizer against
open_clip's ``SimpleTokenizer`` on open_clip's own vocabulary file.
"""

import dataclasses
import gzip
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from unclip_jax.models.clip import CLIP, CLIPConfig, dummy_inputs
from unclip_jax.pipelines.convert import clip as convert_clip
from unclip_jax.pipelines.convert.clip import OPENAI_MEAN, OPENAI_STD, ConversionError
from unclip_jax.pipelines.convert.clip_bpe import ClipBPETokenizer

# Heads follow OpenAI's width // 64 rule, so infer_config recovers this config exactly.
SMALL = CLIPConfig(embed_dim=48, image_size=32, patch_size=8, vision_width=128,
                   vision_layers=2, vision_heads=2, vocab_size=100, context_length=16,
                   text_width=64, text_layers=2, text_heads=1, eos_id=99, pad_id=0)


def _random_params(cfg, seed=0):
    """Our params with every leaf random (biases and LN included), as float32 numpy."""
    d = dummy_inputs(cfg)
    params = nn.meta.unbox(jax.jit(CLIP(cfg).init)(jax.random.key(seed), d["image"],
                                                     d["tokens"]))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(x, np.float32) + rng.normal(0, 0.05, np.shape(x)).astype(np.float32)
              for x in leaves]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _tokens(cfg, rng, batch=3):
    """Rows of random word ids, an EOS at varied positions, zero padding after it."""
    toks = np.zeros((batch, cfg.context_length), np.int32)
    for i in range(batch):
        n = int(rng.integers(2, cfg.context_length))
        toks[i, :n] = rng.integers(1, cfg.vocab_size - 2, n)
        toks[i, n - 1] = cfg.eos_id
    return toks


def _encode(cfg, params, images, tokens):
    model = CLIP(cfg)
    v = {"params": params}
    return (np.asarray(model.apply(v, images, method=model.encode_image)),
            np.asarray(model.apply(v, tokens, method=model.encode_text)))


@pytest.fixture(scope="module")
def small():
    params = _random_params(SMALL)
    return params, convert_clip.to_state_dict(params, SMALL)


# ----------------------------------------------------------------------------- plain


def test_infer_config_reads_shapes(small):
    _, sd = small
    cfg = convert_clip.infer_config(sd)
    assert cfg == SMALL
    assert convert_clip.infer_config(sd, act="gelu").act == "gelu"
    with pytest.raises(TypeError, match="not_a_field"):
        convert_clip.infer_config(sd, not_a_field=1)


def test_infer_config_heads_override_for_widths_off_the_64_rule():
    """A text width of 48 has no OpenAI head count: it needs text_heads=..., which must
    divide the width."""
    cfg = dataclasses.replace(SMALL, text_width=48, text_heads=2)
    sd = convert_clip.to_state_dict(_random_params(cfg), cfg)
    with pytest.raises(ConversionError, match="text width 48 is not a multiple of 64"):
        convert_clip.infer_config(sd)
    assert convert_clip.infer_config(sd, text_heads=2).text_heads == 2
    with pytest.raises(ConversionError, match="text_heads=5 does not divide the text width 48"):
        convert_clip.infer_config(sd, text_heads=5)


def test_round_trip_is_exact(small):
    params, sd = small
    assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 128, 128)
    cfg, converted = convert_clip.convert(sd, image_mean=None)
    assert cfg == SMALL
    flat_a = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(converted)[0])
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(leaf), flat_b[path], err_msg=str(path))


def test_folded_normalisation_matches_normalised_input(small):
    """Converted (folded) model on [-1, 1] images == unfolded model on (x01 - mean) / std."""
    params, sd = small
    _, folded = convert_clip.convert(sd)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    normalised = (((x + 1) / 2 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD))
    tokens = _tokens(SMALL, rng)
    img_ref, txt_ref = _encode(SMALL, params, normalised.astype(np.float32), tokens)
    img, txt = _encode(SMALL, folded, x, tokens)
    np.testing.assert_allclose(img, img_ref, atol=1e-5)
    np.testing.assert_array_equal(txt, txt_ref)


def test_errors_list_every_bad_key(small):
    _, sd = small
    bad = dict(sd)
    del bad["visual.ln_post.bias"]
    del bad["transformer.resblocks.1.mlp.c_fc.bias"]
    bad["visual.some_new_head.weight"] = np.zeros(3, np.float32)
    bad["transformer.resblocks.0.attn.out_proj.bias"] = np.zeros(63, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_clip.convert(bad)
    msg = str(e.value)
    for key in ("visual.ln_post.bias", "transformer.resblocks.1.mlp.c_fc.bias",
                "visual.some_new_head.weight", "transformer.resblocks.0.attn.out_proj.bias"):
        assert key in msg
    assert "missing keys (2)" in msg and "unknown keys (1)" in msg
    assert "mis-shaped keys (1)" in msg


def test_explicit_config_mismatch_is_reported(small):
    _, sd = small
    cfg = dataclasses.replace(SMALL, vision_layers=3, text_width=128, text_heads=2)
    with pytest.raises(ConversionError) as e:
        convert_clip.convert(sd, cfg)
    msg = str(e.value)
    assert "visual.transformer.resblocks.2.attn.in_proj_weight" in msg   # missing layer
    assert "token_embedding.weight" in msg                                # wrong width


def test_ignored_keys_prefix_and_wrapper(small):
    _, sd = small
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    wrapped["state_dict"]["module.attn_mask"] = np.zeros((16, 16), np.float32)
    cfg, _ = convert_clip.convert(wrapped, image_mean=None)
    assert cfg == SMALL


def test_resnet_checkpoints_are_refused():
    with pytest.raises(ConversionError, match="ResNet"):
        convert_clip.infer_config({"visual.layer1.0.conv1.weight": np.zeros((1, 1, 1, 1))})


def test_workdir_loads_with_load_clip(tmp_path, small):
    from unclip_jax.train.runs import load_clip

    params, sd = small
    cfg, converted = convert_clip.convert(sd, image_mean=None)
    out = convert_clip.save_workdir(cfg, converted, tmp_path / "run", source="test")
    loaded = load_clip(out)
    restored, loaded_cfg = loaded.params, loaded.config
    assert loaded_cfg == SMALL
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    tokens = _tokens(SMALL, rng)
    for a, b in zip(_encode(SMALL, params, x, tokens), _encode(loaded_cfg, restored, x, tokens)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError):
        convert_clip.save_workdir(cfg, converted, out)


def test_load_state_dict_reads_safetensors(tmp_path, small):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, sd = small
    path = tmp_path / "clip.safetensors"
    safetensors_numpy.save_file(sd, str(path))
    loaded = convert_clip.load_state_dict(path)
    assert set(loaded) == set(sd)
    for key in sd:
        np.testing.assert_array_equal(loaded[key], sd[key])
    with pytest.raises(FileNotFoundError):
        convert_clip.load_state_dict(tmp_path / "absent.safetensors")


@pytest.mark.parity
def test_load_state_dict_reads_torch_files_weights_only(tmp_path, small):
    torch = pytest.importorskip("torch")
    _, sd = small
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {k: torch.from_numpy(v).to(torch.bfloat16 if "ln_" in k
                                                         else torch.float32)
                               for k, v in sd.items()}}, path)
    loaded = convert_clip.load_state_dict(path)
    assert set(loaded) == set(sd) and loaded["visual.ln_pre.weight"].dtype == np.float32
    cfg, _ = convert_clip.convert(loaded, image_mean=None)
    assert cfg == SMALL


def _tiny_vocab(tmp_path):
    """A merges file with a version header and a few merges (ids follow CLIP's layout)."""
    merges = ["h e", "l l", "he ll", "hell o</w>", "t h", "th e</w>"]
    path = tmp_path / "tiny.txt.gz"
    path.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges) + "\n").encode()))
    return path, merges


def test_tokenizer_mechanics_on_a_tiny_vocabulary(tmp_path):
    path, merges = _tiny_vocab(tmp_path)
    tok = ClipBPETokenizer(path, context_length=8)
    assert tok.vocab_size == 512 + len(merges) + 2
    assert (tok.sot_id, tok.eot_id) == (512 + len(merges), 513 + len(merges))
    hello = tok.encoder["hello</w>"]
    the = tok.encoder["the</w>"]
    assert tok.encode("  HELLO\n\tthe ") == [hello, the]
    assert tok.encode("&amp;amp;") == [tok.encoder["&</w>"]]          # unescaped twice
    assert tok.decode(tok.encode("hello the")) == "hello the "
    rows = tok(["hello", "hello " * 20])
    assert rows.dtype == np.int32 and rows.shape == (2, 8)
    assert rows[0].tolist() == [tok.sot_id, hello, tok.eot_id, 0, 0, 0, 0, 0]
    assert rows[1, 0] == tok.sot_id and rows[1, -1] == tok.eot_id
    assert rows[1, 1:-1].tolist() == [hello] * 6
    assert tok.encode("<start_of_text>") == [tok.sot_id]
    # CLIP's pre-tokenizer: letters group, numbers split one per token (\p{N}, not just \d)
    assert tok.pattern.findall("abc²³ ½7 don't") == ["abc", "²", "³", "½", "7", "don", "'t"]


# ----------------------------------------------------------------------------- parity


def _hf_to_openai(sd, vision_layers, text_layers):
    """A Hugging Face ``CLIPModel`` state dict in OpenAI / open_clip key layout."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    for ours, hf, layers in (("visual.transformer", "vision_model.encoder", vision_layers),
                             ("transformer", "text_model.encoder", text_layers)):
        for i in range(layers):
            o, h = f"{ours}.resblocks.{i}", f"{hf}.layers.{i}"
            for kind in ("weight", "bias"):
                out[f"{o}.attn.in_proj_{kind}"] = np.concatenate(
                    [take(f"{h}.self_attn.{n}_proj.{kind}") for n in "qkv"])
                out[f"{o}.attn.out_proj.{kind}"] = take(f"{h}.self_attn.out_proj.{kind}")
                out[f"{o}.ln_1.{kind}"] = take(f"{h}.layer_norm1.{kind}")
                out[f"{o}.ln_2.{kind}"] = take(f"{h}.layer_norm2.{kind}")
                out[f"{o}.mlp.c_fc.{kind}"] = take(f"{h}.mlp.fc1.{kind}")
                out[f"{o}.mlp.c_proj.{kind}"] = take(f"{h}.mlp.fc2.{kind}")
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = take(f"vision_model.pre_layrnorm.{kind}")
        out[f"visual.ln_post.{kind}"] = take(f"vision_model.post_layernorm.{kind}")
        out[f"ln_final.{kind}"] = take(f"text_model.final_layer_norm.{kind}")
    out["visual.conv1.weight"] = take("vision_model.embeddings.patch_embedding.weight")
    out["visual.class_embedding"] = take("vision_model.embeddings.class_embedding")
    out["visual.positional_embedding"] = take(
        "vision_model.embeddings.position_embedding.weight")
    out["visual.proj"] = take("visual_projection.weight").T
    out["token_embedding.weight"] = take("text_model.embeddings.token_embedding.weight")
    out["positional_embedding"] = take("text_model.embeddings.position_embedding.weight")
    out["text_projection"] = take("text_projection.weight").T
    out["logit_scale"] = take("logit_scale")
    left = sorted(set(sd) - used)
    assert not left, f"HF keys not mapped: {left}"
    return out


@pytest.mark.parity
def test_parity_with_transformers_clip():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = SMALL
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(common, vocab_size=cfg.vocab_size, hidden_size=cfg.text_width,
                         intermediate_size=4 * cfg.text_width,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         max_position_embeddings=cfg.context_length, eos_token_id=cfg.eos_id,
                         bos_token_id=cfg.eos_id - 1, pad_token_id=0),
        vision_config=dict(common, hidden_size=cfg.vision_width,
                           intermediate_size=4 * cfg.vision_width,
                           num_hidden_layers=cfg.vision_layers,
                           num_attention_heads=cfg.vision_heads, image_size=cfg.image_size,
                           patch_size=cfg.patch_size),
        projection_dim=cfg.embed_dim)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(hf_cfg).eval()
    with torch.no_grad():   # every tensor random, so biases and LN params are exercised
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = _hf_to_openai(ref.state_dict(), cfg.vision_layers, cfg.text_layers)
    ours_cfg, params = convert_clip.convert(sd)
    assert ours_cfg == cfg

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    normalised = (((x + 1) / 2 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD))
    tokens = _tokens(cfg, rng, batch=4)
    with torch.no_grad():
        pix = torch.from_numpy(normalised.transpose(0, 3, 1, 2).astype(np.float32))
        out = ref(input_ids=torch.from_numpy(tokens.astype(np.int64)), pixel_values=pix)
        img_ref = out.image_embeds.numpy()     # projected and L2-normalised
        txt_ref = out.text_embeds.numpy()
        scale_ref = float(ref.logit_scale.exp())
    img, txt = _encode(cfg, params, x, tokens)
    rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))  # noqa: E731
    print(f"CLIP parity: image max rel diff {rel(img, img_ref):.2e}, "
          f"text {rel(txt, txt_ref):.2e}")
    assert rel(img, img_ref) < 1e-4
    assert rel(txt, txt_ref) < 1e-4
    model = CLIP(cfg)
    scale = float(model.apply({"params": params}, method=model.scale))
    assert scale == pytest.approx(min(scale_ref, cfg.max_logit_scale), rel=1e-6)


def _open_clip_tokenizer_module():
    """open_clip's ``tokenizer.py`` loaded on its own: the ``open_clip`` package ``__init__``
    imports torchvision, whose CUDA build cannot load on a CPU-only torch."""
    pytest.importorskip("torch")
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


TEXTS = [
    "a photo of a cat",
    "A PHOTO OF A DOG.",
    "  lots   of\twhite\nspace  ",
    "it's what they've said, isn't it? I'll go; you'd stay & we'll see",
    "numbers: 3.14159, 2024-01-01, 1st 2nd 3rd, ²³ ½ Ⅻ",
    "punctuation!!! ... ??? --- (brackets) [more] {curly} <angle> @#$%^&*_+=~`|\\/",
    "unicode: café naïve résumé Straße Ærøskøbing",
    "CJK: 猫の写真 一只猫的照片 고양이 사진",
    "emoji 🐱🐶🎉 and 👩‍👩‍👧 families",
    "html: &amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &amp;amp;",
    "mojibake: Ã©tÃ© and curly “quotes” ‘single’ ﬁ ligature ｆｕｌｌｗｉｄｔｈ",
    "special tokens in text <start_of_text> and <end_of_text> inline",
    "",
    "x",
    "Ünïcödé ΑΒΓ αβγ Привет мир עברית العربية हिन्दी",
    " ".join(["a long caption about a small red bicycle leaning on a fence"] * 12),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.mark.parity
def test_tokenizer_matches_open_clip():
    oc = _open_clip_tokenizer_module()
    reference = oc.SimpleTokenizer()
    ours = ClipBPETokenizer(oc.default_bpe())
    assert ours.vocab_size == len(reference.encoder) == 49408
    assert (ours.sot_id, ours.eot_id) == (49406, 49407)
    assert ours.encoder == reference.encoder
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    np.testing.assert_array_equal(ours(TEXTS), reference(TEXTS).numpy())
    np.testing.assert_array_equal(ours(TEXTS, context_length=16),
                                  reference(TEXTS, context_length=16).numpy())
