"""The decoder's compute-efficiency options (issue 20): patched U-Net input, the training
timestep distribution, the sampling spacing, and the errors for values they cannot take."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from unclip_jax.core import diffusion
from unclip_jax.core.nn.unet import UNet, depth_to_space, space_to_depth
from unclip_jax.models import decoder as D
from unclip_jax.models import sampling as S
from unclip_jax.pipelines import unclip as U

CFG = D.DecoderConfig(image_size=16, clip_dim=8, base_channels=8, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(4,), head_channels=8,
                      num_timesteps=100, sample_steps=3, model_output="v", groups=4)


def init_params(cfg: D.DecoderConfig) -> dict:
    """The decoder's initial params, unboxed."""
    return nn.meta.unbox(D.init_decoder(cfg, jax.random.key(0))["params"])


def test_space_to_depth_layout_and_inverse():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 12)
    # channel (dy·p + dx)·C + c of pixel (y, x) is input pixel (2y + dy, 2x + dx), channel c
    for dy in range(2):
        for dx in range(2):
            np.testing.assert_array_equal(y[:, :, :, (dy * 2 + dx) * 3:(dy * 2 + dx + 1) * 3],
                                          x[:, dy::2, dx::2, :])
    np.testing.assert_array_equal(depth_to_space(y, 2), x)


def test_patched_unet_is_the_unet_on_patches():
    """A patch-2 U-Net equals the unpatched U-Net (same params) run on space-to-depth input
    with its output unfolded: patching changes where the first level runs, nothing else."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([3, 70])
    patched = UNet(6, 8, (1, 2), 1, (2,), True, 8, groups=4, patch_size=2)
    plain = UNet(24, 8, (1, 2), 1, (2,), True, 8, groups=4)
    params = patched.init(jax.random.key(1), x, t)
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
                          params)                    # nonzero output layers
    out = patched.apply(params, x, t)
    assert out.shape == (2, 16, 16, 6)
    ref = depth_to_space(plain.apply(params, space_to_depth(x, 2), t), 2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_full_res_path_starts_as_the_patched_unet_and_reads_single_pixels():
    """With ``full_res_channels`` the patched U-Net's parameters and, at init (the path's last
    conv is zero), its output are unchanged; once trained, the path's output at a pixel depends
    on that pixel's own neighbourhood, not on its 2×2 patch: a one-pixel change moves it within
    the three 3×3 convs' 7×7 window (plus what the patched path reads)."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([3, 70])
    base = UNet(6, 8, (1, 2), 1, (2,), True, 8, groups=4, patch_size=2)
    full = UNet(6, 8, (1, 2), 1, (2,), True, 8, groups=4, patch_size=2, full_res_channels=4)
    p0, p1 = base.init(jax.random.key(1), x, t), full.init(jax.random.key(1), x, t)
    extra = set(p1["params"]) - set(p0["params"])
    assert extra == {"full_res_in", "full_res_up", "full_res_norm_0", "full_res_conv_0",
                     "full_res_norm_1", "full_res_conv_1"}
    for k in p0["params"]:
        jax.tree.map(np.testing.assert_array_equal, p0["params"][k], p1["params"][k])
    np.testing.assert_array_equal(full.apply(p1, x, t), base.apply(p0, x, t))
    # the full-res path alone (the patched U-Net's output layer zeroed), trained-like weights
    p1 = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), p1)
    p1["params"]["conv_out"] = jax.tree.map(jnp.zeros_like, p1["params"]["conv_out"])
    p1["params"]["full_res_up"] = jax.tree.map(jnp.zeros_like, p1["params"]["full_res_up"])
    y = full.apply(p1, x, t)
    # GroupNorm statistics couple every pixel a little; the 3×3 convs couple the 7×7 window
    y2 = full.apply(p1, x.at[:, 8, 8].add(0.5), t)
    moved = np.abs(np.asarray(y2 - y)).max(axis=(0, 3))
    outside = np.delete(np.delete(moved, range(5, 12), 0), range(5, 12), 1)
    assert moved[5:12, 5:12].mean() > 10 * outside.mean()
    assert moved[8, 8] > 3 * outside.max()


def test_res_blocks_per_level():
    """An int is that many blocks at every level (same parameters, same output as the tuple);
    a tuple puts its blocks level by level (the up path one more each)."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([3, 70])
    shared, listed = UNet(3, 8, (1, 2), 1, (2,), groups=4), UNet(3, 8, (1, 2), (1, 1), (2,),
                                                                  groups=4)
    params = shared.init(jax.random.key(1), x, t)
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
                          params)
    np.testing.assert_array_equal(listed.apply(params, x, t), shared.apply(params, x, t))
    names = set(UNet(3, 8, (1, 2), (2, 1), (2,), groups=4).init(
        jax.random.key(1), x, t)["params"])
    assert {"down_0_res_1", "up_0_res_2", "down_1_res_0", "up_1_res_1"} <= names
    assert not {"down_1_res_1", "up_1_res_2", "up_0_res_3"} & names
    # the config override parses a per-level list
    from unclip_jax.core import config as config_lib
    cfg = config_lib.apply_overrides(CFG, ["num_res_blocks=2,1"])
    assert cfg.num_res_blocks == (2, 1)
    assert config_lib.apply_overrides(CFG, ["num_res_blocks=3"]).num_res_blocks == 3


def test_patched_decoder_trains_and_samples():
    cfg = dataclasses.replace(CFG, patch_size=2, timestep_sampling="logit_normal")
    D.check_decoder_config(cfg)
    params = init_params(cfg)
    x0 = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)
    emb = jax.random.normal(jax.random.key(2), (4, 8))
    loss, metrics = D.decoder_loss(params, cfg, x0, emb / jnp.linalg.norm(emb, axis=1,
                                                                          keepdims=True),
                                   None, jax.random.key(3))
    assert np.isfinite(float(loss)) and "vlb" in metrics
    out = S.sample_images(params, cfg, emb, steps=2)
    assert out.shape == (4, 16, 16, 3)


@pytest.mark.parametrize("change, match", [
    ({"patch_size": 3}, r"decoder patch_size 3 does not fit 16 px images with 2 U-Net levels"
                        r".*accepted here: 1, 2, 4, 8"),
    ({"patch_size": 0}, r"patch_size 0 .*accepted here"),
    ({"patch_size": 8, "channel_mult": (1, 2, 2)}, r"accepted here: 1, 2, 4$"),
    ({"timestep_sampling": "cosine"}, r"unknown timestep sampling 'cosine'; accepted: uniform, "
                                      r"logit_normal, log_sigma_normal"),
    ({"timestep_sampling": "logit_normal", "timestep_scale": 0.0}, r"needs a scale > 0"),
    ({"patch_size": 2, "attention_resolutions": (16,)},
     r"attention_resolutions \[16\] are not feature-map sides .* accepted: 8, 4"),
    ({"num_res_blocks": (2, 1, 1)}, r"num_res_blocks \(2, 1, 1\) does not fit a U-Net of 2 "
                                    r"levels; accepted: one int ≥ 1 for every level, or 2 ints"),
    ({"num_res_blocks": 0}, r"num_res_blocks 0 does not fit .* accepted: one int ≥ 1"),
    ({"num_res_blocks": (2, 0)}, r"num_res_blocks \(2, 0\) does not fit"),
    ({"patch_size": 1, "full_res_channels": 8}, r"full_res_channels 8 does not fit patch_size 1; "
                                               r"accepted: 0, or a channel count ≥ 1 with "
                                               r"patch_size > 1"),
    ({"patch_size": 2, "full_res_channels": -1}, r"full_res_channels -1 does not fit"),
    ({"guidance_interval": (1.0,)}, r"guidance_interval must be None or a \(sigma_lo, sigma_hi\) "
                                   r"pair, got \(1.0,\)"),
    ({"guidance_interval": (1.0, 0.5)}, r"needs 0 ≤ sigma_lo < sigma_hi"),
    ({"guidance_interval": (-1.0, 2.0)}, r"needs 0 ≤ sigma_lo < sigma_hi"),
    ({"uncond_drop_prob": 1.5}, r"uncond_drop_prob 1.5 is not a probability; accepted: "
                                r"0 <= uncond_drop_prob <= 1"),
    ({"text_drop_prob": -0.1}, r"text_drop_prob -0.1 is not a probability"),
    ({"clip_mlp": -1}, r"clip_mlp -1 is not a width; accepted: 0 \(the paper's linear "
                       r"projections of the embedding\) or a positive hidden width"),
    ({"repa_weight": -0.5}, r"repa_weight -0.5 is not a loss weight; accepted: 0 \(no "
                            r"representation alignment, the paper's decoder\) or a positive "
                            r"weight \(REPA: 0.5\)"),
    ({"repa_weight": 0.5, "repa_hidden": 0}, r"repa_hidden 0 is not a width; accepted: a "
                                             r"positive hidden width"),
    ({"repa_min_t": 1.0}, r"repa_min_t 1.0 is not a fraction of the schedule; accepted: "
                          r"0 <= repa_min_t < 1 \(0: align at every step"),
    ({"repa_min_t": -0.1}, r"repa_min_t -0.1 is not a fraction of the schedule"),
    ({"self_condition": 1.0}, r"self_condition 1.0 is not a self-conditioning probability; "
                              r"accepted: 0 \(off\) or 0 < p < 1 \(the paper's 0.5\)"),
    ({"self_condition": -0.5}, r"self_condition -0.5 is not a self-conditioning probability"),
])
def test_recipe_options_that_cannot_be_taken_name_the_accepted_values(change, match):
    with pytest.raises(ValueError, match=match):
        D.check_decoder_config(dataclasses.replace(CFG, **change))


def test_upsampler_patch_size_checked_and_crop_fits():
    ups = D.UpsamplerConfig(image_size=64, low_res_size=32, channel_mult=(1, 2), patch_size=2)
    D.check_upsampler_config(ups)
    assert ups.train_crop % (ups.factor * 2 * 2) == 0
    with pytest.raises(ValueError, match="upsampler patch_size 3"):
        D.check_upsampler_config(dataclasses.replace(ups, patch_size=3))


# ---------------------------------------------------------------------------- timesteps

N = 1000
SCHED = diffusion.make_schedule("cosine", N)


def _draw(kind, loc=0.0, scale=1.0, n=200_000):
    return np.asarray(diffusion.sample_timesteps(jax.random.key(0), n, N, kind, loc, scale,
                                                 SCHED))


def test_logit_normal_timesteps_follow_their_distribution():
    for loc, scale in ((0.0, 1.0), (0.5, 0.8)):
        i = _draw("logit_normal", loc, scale)
        assert i.min() >= 0 and i.max() <= N - 1 and i.dtype == np.int32
        # (i + ½)/N is the logit-normal variable up to the floor: compare quantiles.
        for q in (0.1, 0.5, 0.9):
            want = N / (1 + np.exp(-(loc + scale * stats.norm.ppf(q))))
            assert abs(np.quantile(i, q) - want) < 3, (loc, scale, q)


def test_log_sigma_normal_timesteps_follow_their_distribution():
    ac = np.asarray(SCHED.alphas_cumprod, np.float64)
    log_sigma = 0.5 * (np.log1p(-ac) - np.log(ac))
    i = _draw("log_sigma_normal", -1.2, 1.2)
    s = log_sigma[i]
    assert abs(np.median(s) - (-1.2)) < 0.02
    assert abs(np.quantile(s, 0.84) - np.quantile(s, 0.16) - 2 * 1.2) < 0.05
    # every draw went to a nearest step: never further than half the local spacing
    target = -1.2 + 1.2 * np.asarray(jax.random.normal(jax.random.key(0), (200_000,)))
    inside = (target > log_sigma[1]) & (target < log_sigma[-2])
    gap = np.maximum(np.diff(log_sigma)[np.minimum(i, N - 2)], np.diff(log_sigma)[i - 1])
    assert np.all(np.abs(s - target)[inside] <= gap[inside] / 2 + 1e-5)


def test_uniform_timesteps_are_unchanged():
    a = np.asarray(diffusion.sample_timesteps(jax.random.key(3), 64, N))
    b = np.asarray(jax.random.randint(jax.random.key(3), (64,), 0, N, dtype=jnp.int32))
    np.testing.assert_array_equal(a, b)


def test_logsnr_spacing_is_a_stage_spacing():
    s = U.stage_schedule("cosine", 1000, 20, "logsnr")
    ref = diffusion.make_schedule("cosine", 1000, "logsnr20")
    np.testing.assert_array_equal(s.timesteps, ref.timesteps)
    with pytest.raises(ValueError, match="accepted: 'even', 'unclip', 'logsnr'"):
        U.stage_schedule("cosine", 1000, 20, "lognsr")


def test_text_class_emb_feeds_the_final_caption_state_to_the_timestep_embedding():
    """GLIDE's class embedding: with ``text_class_emb`` the caption state at the EOS position
    (the last valid token) is projected into the timestep embedding — changing only that
    state changes the output; states after it (padding) never matter."""
    cfg = dataclasses.replace(CFG, text_layers=1, text_width=16, vocab_size=20,
                              context_length=6, text_class_emb=True, attention_resolutions=())
    model = D.Decoder(cfg)
    tokens = jnp.array([[1, 5, 6, 2, 0, 0]])
    variables = D.init_decoder(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: getattr(a, "value", a), variables["params"],
                          is_leaf=lambda a: hasattr(a, "value"))
    params = jax.tree_util.tree_map_with_path(      # random weights, attention gates shut
        lambda path, a: (jnp.zeros_like(a) if "gate" in jax.tree_util.keystr(path)
                         else a + 0.05 * jax.random.normal(jax.random.key(1), a.shape)),
        params)
    assert params["text_to_emb"]["kernel"].shape == (16, 4 * cfg.base_channels)
    text = model.apply({"params": params}, tokens, method=D.Decoder.encode_caption)
    x = jax.random.normal(jax.random.key(2), (1, 16, 16, 3))
    cond = {"image_emb": jnp.ones((1, 8)) / np.sqrt(8), "text": text}

    def out(states):
        return model.apply({"params": params}, x, jnp.array([40]),
                           dict(cond, text=dict(text, states=states)))

    base = out(text["states"])
    # attention gates are zero: the caption reaches the output only through the class embedding
    changed_eos = out(text["states"].at[0, 3].add(1.0))
    changed_pad = out(text["states"].at[0, 5].add(1.0))
    changed_mid = out(text["states"].at[0, 1].add(1.0))
    assert float(jnp.abs(changed_eos - base).max()) > 1e-4
    np.testing.assert_allclose(changed_pad, base, atol=1e-6)
    np.testing.assert_allclose(changed_mid, base, atol=1e-6)
    with pytest.raises(ValueError, match="text_class_emb .* needs a caption encoder"):
        D.check_decoder_config(dataclasses.replace(CFG, text_class_emb=True))


def test_uncond_drop_prob_reaches_the_decoder_loss():
    """``uncond_drop_prob`` = 1 with no independent drops trains every example on the learned
    nulls (embedding and caption): the loss no longer depends on the embedding; 0 keeps it."""
    cfg = dataclasses.replace(CFG, text_layers=1, text_width=16, vocab_size=20,
                              context_length=6, clip_drop_prob=0.0, text_drop_prob=0.0)
    params = jax.tree.map(        # random weights: zero-initialised outputs ignore the input
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), init_params(cfg))
    x0 = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)
    tokens = jnp.array([[1, 5, 6, 2, 0, 0]] * 4)

    def loss(c, emb):
        return float(D.decoder_loss(params, c, x0, emb, tokens, jax.random.key(2))[0])

    emb_a = jnp.ones((4, 8)) / np.sqrt(8)
    emb_b = jnp.full((4, 8), -1.0) / np.sqrt(8)
    uncond = dataclasses.replace(cfg, uncond_drop_prob=1.0)
    assert loss(uncond, emb_a) == loss(uncond, emb_b)
    assert loss(cfg, emb_a) != loss(cfg, emb_b)


def test_clip_mlp_starts_as_the_paper_decoder_and_reads_the_mlp_features():
    """``clip_mlp``: the other parameters are the paper decoder's, and its output at init is
    the same (the MLP's last layer is zero); with any weights it is the paper decoder fed the
    embedding e + W₂ silu(W₁ s e + b₁) + b₂ (divided back by the scale s = √E), closed form."""
    cfg = dataclasses.replace(CFG, clip_mlp=16)
    base, params = init_params(CFG), init_params(cfg)
    assert set(params) - set(base) == {"clip_mlp_in", "clip_mlp_out"}
    params = {**params, **base}
    x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
    t = jnp.array([3, 40, 90])
    emb = jax.random.normal(jax.random.key(3), (3, 8))
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    out, ref = D.make_denoiser(cfg), D.make_denoiser(CFG)
    np.testing.assert_array_equal(out(params, x, t, {"image_emb": emb}),
                                  ref(base, x, t, {"image_emb": emb}))
    params = jax.tree.map(        # trained-like weights everywhere
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape), params)
    w1, b1 = (np.asarray(params["clip_mlp_in"][k], np.float64) for k in ("kernel", "bias"))
    w2, b2 = (np.asarray(params["clip_mlp_out"][k], np.float64) for k in ("kernel", "bias"))
    s = np.sqrt(8)
    h = np.asarray(emb, np.float64) * s @ w1 + b1
    fed = (np.asarray(emb, np.float64) * s + (h / (1 + np.exp(-h))) @ w2 + b2) / s
    paper = {k: v for k, v in params.items() if not k.startswith("clip_mlp")}
    np.testing.assert_allclose(out(params, x, t, {"image_emb": emb}),
                               ref(paper, x, t, {"image_emb": jnp.asarray(fed, jnp.float32)}),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- REPA

REPA = dataclasses.replace(CFG, repa_weight=0.5, repa_hidden=16, repa_dim=6)


def test_repa_loss_is_one_minus_the_cosine_on_the_pooled_grid():
    """Closed form in numpy: the [B, 8, 8, D] features averaged over 2×2 blocks onto the
    target's 4×4 grid, 1 − cosine per token, averaged per example; 0 for the target itself
    (repeated on the finer grid), 2 for its negation."""
    f = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 6)), np.float64)
    y = np.asarray(jax.random.normal(jax.random.key(1), (2, 4, 4, 6)), np.float64)
    pooled = f.reshape(2, 4, 2, 4, 2, 6).mean(axis=(2, 4))
    cos = np.sum(pooled * y, -1) / np.linalg.norm(pooled, axis=-1) / np.linalg.norm(y, axis=-1)
    np.testing.assert_allclose(D.repa_loss(jnp.asarray(f, jnp.float32),
                                           jnp.asarray(y, jnp.float32)),
                               1 - cos.mean(axis=(1, 2)), rtol=1e-5)
    up = jnp.asarray(y.repeat(2, 1).repeat(2, 2), jnp.float32)
    np.testing.assert_allclose(D.repa_loss(up, jnp.asarray(y, jnp.float32)), 0, atol=1e-6)
    np.testing.assert_allclose(D.repa_loss(-up, jnp.asarray(y, jnp.float32)), 2, atol=1e-6)


def test_repa_head_reads_the_unet_middle_and_leaves_the_denoiser_unchanged():
    """With ``repa_weight`` > 0 the decoder has the paper decoder's parameters plus the
    alignment MLP; its output is the paper decoder's with the same weights, and its features
    are W₂ silu(W₁ m + b₁) + b₂ of the U-Net's middle m (closed form in numpy)."""
    base = init_params(CFG)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape),
                          init_params(REPA))
    assert set(params) - set(base) == {"repa_in", "repa_out"}
    paper = {k: v for k, v in params.items() if not k.startswith("repa")}
    x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
    t = jnp.array([3, 40, 90])
    emb = jax.random.normal(jax.random.key(3), (3, 8))
    cond = {"image_emb": emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)}
    out, feats = D.Decoder(REPA).apply({"params": params}, x, t, cond, return_features=True)
    np.testing.assert_array_equal(out, D.make_denoiser(CFG)(paper, x, t, cond))
    np.testing.assert_array_equal(out, D.make_denoiser(REPA)(params, x, t, cond))
    _, inter = D.Decoder(REPA).apply({"params": params}, x, t, cond, return_features=True,
                                     capture_intermediates=True, mutable=["intermediates"])
    _, middle = inter["intermediates"]["unet"]["__call__"][0]     # the U-Net's (out, middle)
    w1, b1 = (np.asarray(params["repa_in"][k], np.float64) for k in ("kernel", "bias"))
    w2, b2 = (np.asarray(params["repa_out"][k], np.float64) for k in ("kernel", "bias"))
    h = np.asarray(middle, np.float64) @ w1 + b1
    np.testing.assert_allclose(feats, (h / (1 + np.exp(-h))) @ w2 + b2, rtol=1e-4, atol=1e-5)
    assert feats.shape == (3, D.middle_side(CFG), D.middle_side(CFG), 6)


def test_repa_adds_its_weighted_alignment_to_the_decoder_loss():
    """The diffusion terms are those of the paper decoder with the same weights (same x_t,
    same mse); the total grows by the "aux" metric, λ · (1 − cos) ∈ [0, 2λ]; and the
    alignment trains the MLP and the U-Net below the middle, not the up path."""
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape),
                          init_params(REPA))
    paper = {k: v for k, v in params.items() if not k.startswith("repa")}
    x0 = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)
    emb = jnp.ones((4, 8)) / np.sqrt(8)
    target = jax.random.normal(jax.random.key(5), (4, 4, 4, 6))
    rng = jax.random.key(2)
    loss, m = D.decoder_loss(params, REPA, x0, emb, None, rng, repa_target=target)
    loss0, m0 = D.decoder_loss(paper, CFG, x0, emb, None, rng)
    assert float(m["mse"]) == pytest.approx(float(m0["mse"]), rel=1e-6)
    assert 0 < float(m["aux"]) < 2 * REPA.repa_weight
    assert float(loss) == pytest.approx(float(loss0) + float(m["aux"]), rel=1e-5)

    def aux(p):
        return D.decoder_loss(p, REPA, x0, emb, None, rng, repa_target=target)[1]["aux"]

    g = jax.grad(aux)(params)
    norm = {k: float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree.leaves(v)))
            for k, v in g["unet"].items()}
    assert norm["mid_res_1"] > 0 and norm["conv_in"] > 0
    assert all(v == 0 for k, v in norm.items() if k.startswith("up_") or k == "conv_out")
    assert float(jnp.sum(jnp.abs(g["repa_out"]["kernel"]))) > 0
    with pytest.raises(ValueError, match="repa_weight > 0: pass repa_target, the CLIP patch "
                                         "tokens of x0"):
        D.decoder_loss(params, REPA, x0, emb, None, rng)


def test_repa_min_t_aligns_only_the_noisier_steps():
    """With ``repa_min_t`` = 0.5 the auxiliary term of each example is REPA's at t ≥ T/2 and 0
    below (the same weights, input and target); the denoiser's output does not change."""
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape),
                          init_params(REPA))
    half = dataclasses.replace(REPA, repa_min_t=0.5)
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    t = jnp.array([0, 49, 50, 99])                 # T = 100
    emb = jax.random.normal(jax.random.key(3), (4, 8))
    cond = {"image_emb": emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)}
    target = jax.random.normal(jax.random.key(5), (4, 4, 4, 6))
    out, aux = D.make_denoiser(REPA, repa_target=target)(params, x, t, cond)
    out_h, aux_h = D.make_denoiser(half, repa_target=target)(params, x, t, cond)
    np.testing.assert_array_equal(out_h, out)
    assert np.all(np.asarray(aux) > 0)
    np.testing.assert_array_equal(aux_h, np.asarray(aux) * np.array([0, 0, 1, 1]))


def test_repa_grid_must_pool_onto_the_clip_patches():
    D.check_repa_grid(REPA, 4)            # the 8×8 middle pools 2×2 onto a 4×4 grid
    D.check_repa_grid(REPA, 8)
    D.check_repa_grid(REPA, 16)           # or is repeated onto a finer one (U-REPA)
    D.check_repa_grid(CFG, 3)             # no alignment: nothing to check
    with pytest.raises(ValueError, match=r"places the U-Net's 8×8 middle features on the "
                                         r"CLIP's 3×3 patch tokens; accepted: a middle side "
                                         r"\(image_size / \(patch_size · 2\^\(levels − 1\)\)\) "
                                         r"that is a multiple or a divisor of 3"):
        D.check_repa_grid(REPA, 3)
    with pytest.raises(ValueError, match=r"8×8 middle features on the CLIP's 12×12"):
        D.check_repa_grid(REPA, 12)


def test_repa_loss_repeats_a_coarser_map_and_rejects_what_it_cannot_place():
    y = jax.random.normal(jax.random.key(1), (2, 4, 4, 6))
    coarse = jax.random.normal(jax.random.key(0), (2, 2, 2, 6))
    np.testing.assert_allclose(D.repa_loss(coarse, y), D.repa_loss(
        jnp.repeat(jnp.repeat(coarse, 2, 1), 2, 2), y), rtol=1e-6)
    for bad in ((2, 3, 3, 6), (2, 4, 4, 5), (3, 4, 4, 6)):
        with pytest.raises(ValueError, match=r"cannot be placed on target tokens \(2, 4, 4, "
                                             r"6\); accepted: the same batch and width, and "
                                             r"sides that divide one another"):
            D.repa_loss(jnp.zeros(bad), y)


def test_repa_head_needs_its_width_and_its_weight():
    x, t = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)
    cond = {"image_emb": jnp.ones((1, 8)) / np.sqrt(8)}
    with pytest.raises(ValueError, match="repa_weight > 0 needs repa_dim, the CLIP tower's "
                                         "width"):
        init_params(dataclasses.replace(REPA, repa_dim=0))
    with pytest.raises(ValueError, match=r"return_features needs the alignment MLP "
                                         r"\(repa_weight > 0\)"):
        D.Decoder(CFG).apply({"params": init_params(CFG)}, x, t, cond, return_features=True)


def test_clip_patch_tokens_are_the_towers_final_tokens_on_their_grid(tiny_clip_params):
    """``FrozenCLIP.image_patch_tokens``: the image tower's final-LN tokens without the class
    token, row-major on the g × g grid; larger images are resized as for the embedding."""
    from unclip_jax.models.clip import CLIP, FrozenCLIP

    cfg, params = tiny_clip_params
    clip = FrozenCLIP(cfg, params)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
    tokens, _ = CLIP(cfg).apply({"params": params}, x, method=lambda m, x: m.visual(x))
    got = clip.image_patch_tokens(x)
    g = cfg.image_size // cfg.patch_size
    assert got.shape == (2, g, g, cfg.vision_width)
    for i in range(g):
        for j in range(g):
            np.testing.assert_array_equal(got[:, i, j], tokens[:, 1 + i * g + j])
    big = jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)
    np.testing.assert_allclose(clip.image_patch_tokens(big),
                               clip.image_patch_tokens(jax.image.resize(
                                   big, (2, 8, 8, 3), "linear")), rtol=1e-6)


def test_self_conditioned_decoder_reads_its_x0_estimate_trains_and_samples():
    """``self_condition`` > 0: the U-Net reads ``cond["self_cond"]`` beside x_t (its first conv
    takes 2 × 3 channels per pixel; an absent estimate is zeros); the loss trains and the
    pipeline's sampler and inversion run it (their wiring: tests/test_sampler.py)."""
    cfg = dataclasses.replace(CFG, patch_size=2, self_condition=0.5)
    D.check_decoder_config(cfg)
    params = jax.tree.map(        # random weights: zero-initialised outputs ignore the input
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), init_params(cfg))
    plain = init_params(dataclasses.replace(cfg, self_condition=0.0))
    assert (params["unet"]["conv_in"]["kernel"].shape[2]
            == 2 * plain["unet"]["conv_in"]["kernel"].shape[2])
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    t = jnp.array([10, 60])
    emb = jax.random.normal(jax.random.key(3), (2, 8))
    f = D.make_denoiser(cfg)
    zeros = f(params, x, t, {"image_emb": emb, "self_cond": jnp.zeros_like(x)})
    np.testing.assert_array_equal(f(params, x, t, {"image_emb": emb}), zeros)
    assert float(jnp.max(jnp.abs(f(params, x, t, {"image_emb": emb, "self_cond": x}) - zeros))
                 ) > 1e-3
    x0 = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3), minval=-1, maxval=1)
    unit = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    loss, _ = D.decoder_loss(params, cfg, x0, unit, None, jax.random.key(5))
    grads = jax.grad(lambda p: D.decoder_loss(p, cfg, x0, unit, None, jax.random.key(5))[0])(
        params)
    assert np.isfinite(float(loss)) and all(
        np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert S.sample_images(params, cfg, unit, steps=2).shape == (2, 16, 16, 3)
    cond, uncond = S.decoder_conds(cfg, params, unit)
    x_T = diffusion.ddim_invert(f, params, x0, schedule=S.decoder_schedule(cfg, 3), cond=cond,
                                uncond=uncond, guidance_scale=3.0, model_output="v",
                                self_condition=True)
    assert x_T.shape == x0.shape and np.isfinite(np.asarray(x_T)).all()
