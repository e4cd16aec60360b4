"""unCLIP decoder and upsamplers: conditioning paths, guidance nulls, full convolutionality,
augmentations, a short training run, and the shared sampler."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.core import sharding
from unclip_jax.models import decoder as D
from unclip_jax.models import sampling as S

CFG = D.DecoderConfig(image_size=8, clip_dim=6, base_channels=8, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(4,), head_channels=8,
                      text_layers=1, text_width=8, text_heads=2, vocab_size=12,
                      context_length=5, pad_id=0, learned_variance=True, num_timesteps=100)
UPS = D.UpsamplerConfig(image_size=16, low_res_size=8, base_channels=8, channel_mult=(1, 2),
                        num_res_blocks=1, crop_fraction=0.5, num_timesteps=100, sample_steps=3)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
T = jnp.array([5, 80])
EMB = jnp.asarray(RNG.normal(size=(2, 6)) / np.sqrt(6), jnp.float32)
TOK = jnp.array([[1, 4, 5, 2, 0], [1, 7, 2, 0, 0]], jnp.int32)


def random_params(boxed_abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((1.0 if str(path[-1]) == "['scale']" else 0.0)
                                    + 0.2 * rng.normal(size=s.shape), jnp.float32),
        sharding.strip_boxes(boxed_abstract)["params"])


@pytest.fixture(scope="module")
def params():
    return random_params(jax.eval_shape(lambda: D.init_decoder(CFG, jax.random.PRNGKey(0))))


@pytest.fixture(scope="module")
def forward():
    den = D.make_denoiser(CFG)
    return jax.jit(lambda p, x, t, emb, tok: den(p, x, t, D.make_cond(p, CFG, emb, tok)))


def _zero(params, name):
    return dict(params, **{name: jax.tree.map(jnp.zeros_like, params[name])})


def test_output_shape_dtype(params, forward):
    out = forward(params, X, T, EMB, TOK)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32     # ε and σ interpolation
    assert np.all(np.isfinite(out))
    fixed = dataclasses.replace(CFG, learned_variance=False, image_size=16, text_layers=0)
    p16 = random_params(jax.eval_shape(lambda: D.init_decoder(fixed, jax.random.PRNGKey(0))))
    shape = jax.eval_shape(lambda: D.make_denoiser(fixed)(
        p16, jnp.zeros((3, 16, 16, 3)), jnp.zeros((3,), jnp.int32),
        {"image_emb": EMB[:1].repeat(3, 0)}))
    assert shape.shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match="expected \\[B, 8, 8, 3\\]"):
        jax.eval_shape(lambda: forward(params, jnp.zeros((2, 16, 16, 3)), T, EMB, TOK))


def test_clip_tokens_are_attended(params, forward):
    base = forward(params, X, T, EMB, TOK)
    out = forward(_zero(params, "clip_to_tokens"), X, T, EMB, TOK)
    assert float(jnp.max(jnp.abs(out - base))) > 1e-4


def test_embedding_added_to_timestep_embedding(params, forward):
    # With the context-token projection zeroed, the embedding reaches the U-Net only through
    # the timestep embedding: changing it still changes the output ...
    p = _zero(params, "clip_to_tokens")
    a = forward(p, X, T, EMB, TOK)
    b = forward(p, X, T, -EMB, TOK)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    # ... and with that path zeroed as well, it no longer does.
    p = _zero(p, "clip_to_emb")
    a = forward(p, X, T, EMB, TOK)
    b = forward(p, X, T, -EMB, TOK)
    np.testing.assert_allclose(a, b, atol=1e-6)


def _spy_loss(monkeypatch, params, cfg, **kw):
    seen = {}

    def make_spy(cfg_, dropout_rng=None, repa_target=None):
        def spy(p, x_t, t, cond):
            seen["x_t"], seen["cond"] = x_t, cond
            return jnp.zeros(x_t.shape[:-1] + (6,))
        return spy

    monkeypatch.setattr(D, "make_denoiser", make_spy)

    @jax.jit
    def run(p):
        D.decoder_loss(p, cfg, X, EMB, TOK if cfg.use_text else None, jax.random.PRNGKey(3),
                       **kw)
        return dict(seen)

    return run(params)


def test_guidance_dropout_uses_learned_nulls(params, monkeypatch):
    null = D.null_cond(params, CFG)
    text = jax.jit(lambda p: D.encode_caption(p, CFG, TOK))(params)
    keep = _spy_loss(monkeypatch, params, dataclasses.replace(CFG, clip_drop_prob=0.0,
                                                              text_drop_prob=0.0))
    drop_emb = _spy_loss(monkeypatch, params, dataclasses.replace(CFG, clip_drop_prob=1.0,
                                                                  text_drop_prob=0.0))
    drop_txt = _spy_loss(monkeypatch, params, dataclasses.replace(CFG, clip_drop_prob=0.0,
                                                                  text_drop_prob=1.0))
    np.testing.assert_allclose(keep["cond"]["image_emb"], EMB)
    np.testing.assert_allclose(drop_emb["cond"]["image_emb"],
                               np.broadcast_to(null["image_emb"], EMB.shape))
    np.testing.assert_allclose(drop_emb["cond"]["text"]["states"], text["states"], atol=1e-6)
    np.testing.assert_allclose(drop_txt["cond"]["image_emb"], EMB)
    np.testing.assert_allclose(drop_txt["cond"]["text"]["states"],
                               np.broadcast_to(null["text"]["states"], text["states"].shape))
    assert bool(jnp.all(drop_txt["cond"]["text"]["valid"]))
    # the noised input is never replaced
    np.testing.assert_array_equal(keep["x_t"], drop_emb["x_t"])
    np.testing.assert_array_equal(keep["x_t"], drop_txt["x_t"])
    assert float(jnp.abs(null["image_emb"]).sum()) > 0           # a learned (non-zero) null


# a decoder reading a frozen CLIP's text features instead of its own caption encoder
CT_CFG = dataclasses.replace(CFG, text_layers=0, clip_text_width=4)
CLIP_TEXT = {"emb": jnp.asarray(RNG.normal(size=(2, 6)), jnp.float32),
             "states": jnp.asarray(RNG.normal(size=(2, 5, 4)), jnp.float32),
             "valid": TOK > 0}
EMPTY = {"emb": jnp.full((6,), 0.5), "states": jnp.full((5, 4), -1.0),
         "valid": jnp.array([True, True, False, False, False])}


def test_clip_text_is_dropped_to_the_empty_caption(monkeypatch):
    p = random_params(jax.eval_shape(lambda: D.init_decoder(CT_CFG, jax.random.PRNGKey(0))))
    # the CLIP text states reach the output (through the context), and so does the text emb
    denoiser = D.make_denoiser(CT_CFG)       # before _spy_loss patches make_denoiser
    den = jax.jit(lambda q, c: denoiser(q, X, T, {"image_emb": EMB, "clip_text": c}))
    base = den(p, CLIP_TEXT)
    for key in ("emb", "states"):
        moved = den(p, dict(CLIP_TEXT, **{key: -CLIP_TEXT[key]}))
        assert float(jnp.max(jnp.abs(moved - base))) > 1e-4, key
    kw = dict(clip_text=CLIP_TEXT, clip_text_null=EMPTY)
    keep = _spy_loss(monkeypatch, p, dataclasses.replace(CT_CFG, clip_drop_prob=0.0,
                                                         text_drop_prob=0.0), **kw)
    drop = _spy_loss(monkeypatch, p, dataclasses.replace(CT_CFG, clip_drop_prob=0.0,
                                                         text_drop_prob=1.0), **kw)
    for key in ("emb", "states", "valid"):
        np.testing.assert_array_equal(keep["cond"]["clip_text"][key], CLIP_TEXT[key])
        np.testing.assert_array_equal(drop["cond"]["clip_text"][key],
                                      np.broadcast_to(EMPTY[key], CLIP_TEXT[key].shape))
    np.testing.assert_allclose(drop["cond"]["image_emb"], EMB)      # dropped independently
    with pytest.raises(ValueError, match="needs clip_text_null"):
        D.decoder_loss(p, CT_CFG, X, EMB, None, jax.random.PRNGKey(3), clip_text=CLIP_TEXT)


def test_clip_noise_perturbs_only_the_embedding(params, monkeypatch):
    """``clip_noise``: the conditioning embedding is moved off the input by a random amount
    and re-normalised; the noised image x_t (the loss's own randomness) is unchanged."""
    base = dataclasses.replace(CFG, clip_drop_prob=0.0, text_drop_prob=0.0)
    keep = _spy_loss(monkeypatch, params, base)
    noisy = _spy_loss(monkeypatch, params, dataclasses.replace(base, clip_noise=0.5))
    z = np.asarray(noisy["cond"]["image_emb"])
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
    cos = np.sum(z * np.asarray(EMB), -1) / np.linalg.norm(EMB, axis=-1)
    assert np.all(cos < 1 - 1e-4) and np.all(cos > 0.5), cos
    np.testing.assert_array_equal(keep["x_t"], noisy["x_t"])
    np.testing.assert_allclose(keep["cond"]["image_emb"], EMB)


def test_sampler_runs_four_ddim_steps(params):
    # sample_images → diffusion.make_sampler → diffusion.sample, guided against the nulls
    out = S.sample_images(params, CFG, EMB, TOK, jax.random.PRNGKey(1), guidance_scale=3.0,
                          steps=4, method="ddim", eta=0.5)
    assert out.shape == (2, 8, 8, 3) and np.all(np.isfinite(out))
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-5


@pytest.mark.slow
def test_short_training_reduces_loss():
    cfg = dataclasses.replace(CFG, text_layers=0, learned_variance=False, clip_drop_prob=0.0)
    params = sharding.strip_boxes(D.init_decoder(cfg, jax.random.PRNGKey(0)))["params"]
    tx = optax.adam(3e-3)
    keys = jax.random.split(jax.random.PRNGKey(7), 4)

    def eval_loss(p):
        return jnp.mean(jax.vmap(lambda k: D.decoder_loss(p, cfg, X, EMB, None, k)[0])(keys))

    @jax.jit
    def step(p, o, k):
        g = jax.grad(lambda q: D.decoder_loss(q, cfg, X, EMB, None, k)[0])(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    before = float(jax.jit(eval_loss)(params))
    p, o = params, tx.init(params)
    for k in jax.random.split(jax.random.PRNGKey(1), 25):
        p, o = step(p, o, k)
    after = float(jax.jit(eval_loss)(p))
    assert after < 0.7 * before, (before, after)


# ----------------------------------------------------------------------------- upsampler


@pytest.fixture(scope="module")
def ups_params():
    return random_params(jax.eval_shape(lambda: D.init_upsampler(UPS, jax.random.PRNGKey(0))))


def test_upsampler_fully_convolutional(ups_params):
    den = jax.jit(D.make_upsampler_denoiser(UPS))
    assert UPS.train_crop == 8
    for low in (4, 8):                 # a training crop and the whole image
        x = jnp.zeros((1, 2 * low, 2 * low, 3))
        out = den(ups_params, x, jnp.array([10]),
                  {"low_res": jnp.full((1, low, low, 3), 0.5)})
        assert out.shape == (1, 2 * low, 2 * low, 3) and np.all(np.isfinite(out))
    assert not any("attn" in k for k in ups_params["unet"])


def test_upsampler_size_mismatch_errors(ups_params):
    den = D.make_upsampler_denoiser(UPS)
    with pytest.raises(ValueError, match=r"low-res image \(8, 8\) × factor 2 does not match "
                                         r"the target \(12, 12\)"):
        jax.eval_shape(lambda: den(ups_params, jnp.zeros((1, 12, 12, 3)), jnp.array([1]),
                                   {"low_res": jnp.zeros((1, 8, 8, 3))}))
    deeper = dataclasses.replace(UPS, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"target 10×10 \(low-res × 2\) is not divisible by "
                                         r"the U-Net's downsampling factor 4"):
        S.upsample_images(ups_params, deeper, jnp.zeros((1, 5, 5, 3)), steps=2)
    with pytest.raises(ValueError, match="integer multiple"):
        D.check_upsampler_config(dataclasses.replace(UPS, low_res_size=6))


def test_upsampler_samples(ups_params):
    out = S.upsample_images(ups_params, UPS, jnp.zeros((2, 8, 8, 3)), jax.random.PRNGKey(0))
    assert out.shape == (2, 16, 16, 3) and np.all(np.isfinite(out))


def test_augmentations_keep_shape_and_range():
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (3, 12, 12, 3)), jnp.float32)
    blurred = jax.jit(D.gaussian_blur)(x, jnp.array([0.01, 0.5, 2.0]))
    assert blurred.shape == x.shape
    assert float(blurred.min()) >= -1 and float(blurred.max()) <= 1
    np.testing.assert_allclose(blurred[0], x[0], atol=1e-5)          # σ → 0 is the identity
    assert float(jnp.std(blurred[2])) < float(jnp.std(blurred[1])) < float(jnp.std(x[1]))
    degraded = jax.jit(D.bsr_degrade)(x, jax.random.PRNGKey(0))
    assert degraded.shape == x.shape
    assert float(degraded.min()) >= -1 and float(degraded.max()) <= 1
    assert float(jnp.abs(degraded - x).mean()) > 0.01
    flat = jnp.full((1, 16, 16, 3), 0.2)
    np.testing.assert_allclose(D.jpeg_like(flat, jnp.array([50.0])), flat, atol=2 / 255)
