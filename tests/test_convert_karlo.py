"""Karlo (diffusers layout) conversion: prior, decoder + text_proj, super-resolution U-Nets.

Plain tests (numpy only): synthetic state dicts built from our own param trees in the diffusers
naming, round-tripped, and the error lists for unknown / missing / mis-shaped keys. Parity
tests (``make parity``): randomly initialised *tiny* diffusers models with Karlo-shaped configs
against our converted models on the same inputs, and our sampler's steps against diffusers'
``UnCLIPScheduler`` on the same model outputs and the same noise.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.pipelines.convert import karlo
from unclip_jax.pipelines.convert.clip import ConversionError
from unclip_jax.train import runs

# Karlo-shaped, tiny: widths divisible by the GroupNorm groups, one attention level.
PRIOR_CFG = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12,
                 num_embeddings=7, additional_embeddings=4)
DECODER_CFG = dict(sample_size=16, layers_per_block=1,
                   down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                   up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
                   mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=[16, 32],
                   in_channels=3, out_channels=6, cross_attention_dim=24,
                   class_embed_type="identity", attention_head_dim=8,
                   resnet_time_scale_shift="scale_shift", norm_num_groups=8)
TEXT_PROJ_CFG = dict(clip_extra_context_tokens=4, clip_embeddings_dim=12, time_embed_dim=64,
                     cross_attention_dim=24)
SR_CFG = dict(sample_size=16, in_channels=6, out_channels=3, layers_per_block=1,
              block_out_channels=[16, 32],
              down_block_types=["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"],
              up_block_types=["ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
              add_attention=False, norm_num_groups=8)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ----------------------------------------------------------------------------- synthetic


def _synthetic(spec, shapes, rng, skip=()):
    """A diffusers-named state dict whose tensors convert to random params of ``shapes``
    (inverting each spec entry's map by shape: transposes, head splits)."""
    sd = {}
    for path, (key, fn) in karlo.spec_leaves(spec):
        shape = shapes[path]
        # Find a source shape whose conversion gives ``shape``: try the common layouts.
        for cand in _candidates(shape):
            arr = rng.normal(size=cand).astype(np.float32)
            try:
                if tuple(np.shape(fn(arr))) == shape:
                    sd[key] = arr
                    break
            except ValueError:
                continue
        else:
            raise AssertionError(f"no source layout for {key} -> {shape}")
    return sd


def _candidates(shape):
    s = tuple(shape)
    out = [s[::-1], s, (1,) + s, (1, 1) + s]   # torch Linear: [out, in] first
    if len(s) == 3:
        out += [(s[1] * s[2], s[0]), (s[2], s[0] * s[1])]
    if len(s) == 4:
        out += [(s[3], s[2], s[0], s[1])]
    if len(s) == 2:
        out += [(s[0] * s[1],)]
    return out


def _prior_sd(rng):
    sd_cfg = karlo.prior_config(PRIOR_CFG, {"clip_mean": np.zeros(12), "clip_std": np.ones(12)})
    sd = _synthetic(karlo.prior_spec(sd_cfg), karlo.prior_shapes(sd_cfg), rng)
    sd["clip_mean"] = rng.normal(size=(1, 12)).astype(np.float32)
    sd["clip_std"] = (np.abs(rng.normal(size=(1, 12))) + 0.5).astype(np.float32)
    return sd


def test_prior_synthetic_round_trip():
    rng = np.random.default_rng(0)
    sd = _prior_sd(rng)
    cfg, params = karlo.convert_prior(PRIOR_CFG, sd)
    assert cfg.context_length == 7 and cfg.width == 16 and cfg.depth == 2
    assert cfg.normalization == "standardize" and not cfg.renormalize
    np.testing.assert_allclose(cfg.embed_std, sd["clip_std"][0], rtol=1e-6)
    np.testing.assert_array_equal(params["x_proj"]["kernel"], sd["proj_in.weight"].T)
    q = params["transformer"]["block_1"]["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(q.reshape(16, 16), sd["transformer_blocks.1.attn1.to_q.weight"].T)
    assert not params["null_text_emb"].any()


def test_prior_key_errors_list_every_problem():
    rng = np.random.default_rng(1)
    sd = _prior_sd(rng)
    del sd["proj_in.bias"]
    sd["transformer_blocks.0.attn1.to_k.weight"] = np.zeros((5, 5), np.float32)
    sd["some_new.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        karlo.convert_prior(PRIOR_CFG, sd)
    msg = str(e.value)
    assert "missing keys (1):\n  proj_in.bias" in msg
    assert "unknown keys (1):\n  some_new.weight" in msg
    assert "mis-shaped keys (1):\n  transformer_blocks.0.attn1.to_k.weight (5, 5)" in msg


def test_prior_rejects_unsupported_config():
    sd = _prior_sd(np.random.default_rng(2))
    with pytest.raises(ConversionError, match="added_emb_type = None is not supported; "
                                              "accepted: 'prd'"):
        karlo.convert_prior(dict(PRIOR_CFG, added_emb_type=None), sd)
    del sd["clip_std"]
    with pytest.raises(ConversionError, match="'clip_std' is missing"):
        karlo.convert_prior(PRIOR_CFG, sd)


def _decoder_sd(rng):
    cfg = karlo.decoder_config(DECODER_CFG, TEXT_PROJ_CFG, context_length=5)
    shapes = karlo.decoder_shapes(cfg)
    probe = {f"decoder.{k}": 0 for k in ("down_blocks.1.resnets.0.conv_shortcut.weight",
                                          "up_blocks.0.resnets.0.conv_shortcut.weight",
                                          "up_blocks.0.resnets.1.conv_shortcut.weight",
                                          "up_blocks.1.resnets.0.conv_shortcut.weight",
                                          "up_blocks.1.resnets.1.conv_shortcut.weight")}
    spec, _ = karlo.decoder_spec(cfg, probe)
    return cfg, _synthetic(spec, shapes, rng)


def test_decoder_synthetic_round_trip_and_token_order():
    rng = np.random.default_rng(3)
    cfg, sd = _decoder_sd(rng)
    dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    tp = {k[len("text_proj."):]: v for k, v in sd.items() if k.startswith("text_proj.")}
    cfg2, params = karlo.convert_decoder(DECODER_CFG, dec, TEXT_PROJ_CFG, tp, context_length=5)
    assert cfg2 == cfg and cfg.attention_resolutions == (8,) and cfg.learned_variance
    assert float(params["unet"]["mid_attn"]["gate"].min()) == 1.0
    # diffusers reshapes the token projection to [B, C, 4] then permutes: token k, channel d
    # is output row d·4 + k.
    w = tp["clip_extra_context_tokens_proj.weight"]
    ours = params["clip_to_tokens"]["kernel"]
    k, d = 3, 5
    np.testing.assert_array_equal(ours[:, k * 24 + d], w[d * 4 + k])


def test_decoder_key_errors():
    rng = np.random.default_rng(4)
    _, sd = _decoder_sd(rng)
    dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    tp = {k[len("text_proj."):]: v for k, v in sd.items() if k.startswith("text_proj.")}
    del tp["learned_classifier_free_guidance_embeddings"]
    dec["mid_block.attentions.0.to_q.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError) as e:
        karlo.convert_decoder(DECODER_CFG, dec, TEXT_PROJ_CFG, tp, context_length=5)
    msg = str(e.value)
    assert "text_proj.learned_classifier_free_guidance_embeddings" in msg
    assert "mis-shaped keys (1):\n  decoder.mid_block.attentions.0.to_q.bias (7,)" in msg
    with pytest.raises(ConversionError, match="down block 'CrossAttnDownBlock2D' is not "
                                              "supported"):
        karlo.decoder_config(dict(DECODER_CFG, down_block_types=["ResnetDownsampleBlock2D",
                                                                 "CrossAttnDownBlock2D"]),
                             TEXT_PROJ_CFG)
    with pytest.raises(ConversionError, match="class_embed_type = None"):
        karlo.decoder_config(dict(DECODER_CFG, class_embed_type=None), TEXT_PROJ_CFG)


def test_upsampler_synthetic_round_trip_and_errors():
    rng = np.random.default_rng(5)
    cfg = karlo.upsampler_config(SR_CFG)
    assert (cfg.image_size, cfg.low_res_size, cfg.time_shift) == (16, 4, "add")
    probe = {"down_blocks.1.resnets.0.conv_shortcut.weight": 0,
             **{f"up_blocks.{j}.resnets.{i}.conv_shortcut.weight": 0
                for j in range(2) for i in range(2)}}
    spec, _ = karlo.unet_spec(probe, 2, 1, set(), 0, False)
    sd = _synthetic({"unet": spec}, karlo.upsampler_shapes(cfg), rng)
    _, params = karlo.convert_upsampler(SR_CFG, sd)
    assert params["unet"]["down_0_res_0"]["emb_proj"]["kernel"].shape == (64, 16)
    sd["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError, match="unknown keys \\(1\\):\n  extra.weight"):
        karlo.convert_upsampler(SR_CFG, sd)
    with pytest.raises(ConversionError, match="add_attention = True is not supported"):
        karlo.upsampler_config(dict(SR_CFG, add_attention=True))


def test_convert_checkpoint_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        karlo.convert_checkpoint(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is not a diffusers Karlo pipeline folder"):
        karlo.convert_checkpoint(tmp_path, tmp_path / "out", components=("prior",))
    with pytest.raises(TypeError, match="unknown option\\(s\\) bogus"):
        karlo.convert_checkpoint(tmp_path, tmp_path / "out", bogus=1)
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        karlo.convert_checkpoint(tmp_path, tmp_path / "out", components=("vae",))
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        karlo.convert_checkpoint(tmp_path, tmp_path / "out", components="prior,vae")


# ----------------------------------------------------------------------------- parity


def _randomise(torch, model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            if name in ("clip_std",):
                p.copy_(p.abs() + 0.5)
    return model.eval()


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parity
def test_parity_prior():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import PriorTransformer

    from unclip_jax.models.prior import DiffusionPrior

    ref = _randomise(torch, PriorTransformer(**PRIOR_CFG), 0)
    cfg, params = karlo.convert_prior(dict(ref.config), _state(ref))
    rng = np.random.default_rng(0)
    b = 3
    x_t = rng.normal(size=(b, 12)).astype(np.float32)
    t = np.array([0, 417, 999])
    emb = rng.normal(size=(b, 12)).astype(np.float32)
    states = rng.normal(size=(b, 7, 12)).astype(np.float32)
    mask = np.arange(7)[None] < np.array([7, 4, 2])[:, None]
    with torch.no_grad():
        want = ref(torch.from_numpy(x_t), torch.from_numpy(t), proj_embedding=torch.from_numpy(
            emb), encoder_hidden_states=torch.from_numpy(states),
            attention_mask=torch.from_numpy(mask)).predicted_image_embedding.numpy()
    got = DiffusionPrior(cfg).apply({"params": params}, jnp.asarray(x_t), jnp.asarray(t),
                                    {"text_emb": emb, "text_states": states,
                                     "text_mask": mask})
    print(f"prior parity: max rel diff {rel(got, want):.2e}")
    assert rel(got, want) <= 1e-4


def _decoder_ref(torch):
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    unet = _randomise(torch, UNet2DConditionModel(**DECODER_CFG), 1)
    tp = _randomise(torch, UnCLIPTextProjModel(**TEXT_PROJ_CFG), 2)
    return unet, tp


@pytest.mark.parity
def test_parity_decoder_with_text_proj():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import torch.nn.functional as F

    from unclip_jax.models.decoder import Decoder

    unet, tp = _decoder_ref(torch)
    cfg, params = karlo.convert_decoder(dict(unet.config), _state(unet), dict(tp.config),
                                        _state(tp), context_length=5)
    rng = np.random.default_rng(1)
    b = 2
    x_t = rng.normal(size=(b, 3, 16, 16)).astype(np.float32)
    t = np.array([3, 780])
    img = rng.normal(size=(b, 12)).astype(np.float32)
    temb = rng.normal(size=(b, 12)).astype(np.float32)
    states = rng.normal(size=(b, 5, 12)).astype(np.float32)
    mask = np.arange(5)[None] < np.array([5, 2])[:, None]
    T = torch.from_numpy
    with torch.no_grad():
        hidden, additive = tp(image_embeddings=T(img), prompt_embeds=T(temb),
                              text_encoder_hidden_states=T(states),
                              do_classifier_free_guidance=False)
        want = unet(T(x_t), T(t), encoder_hidden_states=hidden, class_labels=additive,
                    attention_mask=F.pad(T(mask), (4, 0), value=True)).sample.numpy()
    cond = {"image_emb": img, "clip_text": {"emb": temb, "states": states, "valid": mask}}
    got = Decoder(cfg).apply({"params": params}, jnp.asarray(x_t.transpose(0, 2, 3, 1)),
                             jnp.asarray(t), cond)
    got = np.asarray(got).transpose(0, 3, 1, 2)
    print(f"decoder parity: eps max rel diff {rel(got[:, :3], want[:, :3]):.2e}, "
          f"variance {rel(got[:, 3:], want[:, 3:]):.2e}")
    assert rel(got[:, :3], want[:, :3]) <= 1e-4 and rel(got[:, 3:], want[:, 3:]) <= 1e-4
    # The learned null image embedding is diffusers' guidance embedding.
    np.testing.assert_array_equal(params["null_image_emb"],
                                  tp.learned_classifier_free_guidance_embeddings.detach().numpy())


@pytest.mark.parity
def test_parity_upsampler():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    from unclip_jax.models.decoder import Upsampler

    ref = _randomise(torch, UNet2DModel(**SR_CFG), 3)
    cfg, params = karlo.convert_upsampler(dict(ref.config), _state(ref))
    rng = np.random.default_rng(2)
    x_t = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    low = rng.uniform(-1, 1, size=(2, 4, 4, 3)).astype(np.float32)
    t = np.array([5, 600])
    # The reference input as UnCLIPPipeline builds it: the low-res image enlarged bicubically
    # with antialiasing (our converted config: low_res_resize="cubic", inside the Upsampler).
    assert cfg.low_res_resize == "cubic"
    with torch.no_grad():
        up = torch.nn.functional.interpolate(
            torch.from_numpy(low.transpose(0, 3, 1, 2)), size=[16, 16], mode="bicubic",
            align_corners=False, antialias=True)
        inp = torch.cat([torch.from_numpy(x_t.transpose(0, 3, 1, 2)), up], dim=1)
        want = ref(inp, torch.from_numpy(t)).sample.numpy()
    got = Upsampler(cfg).apply({"params": params}, jnp.asarray(x_t), jnp.asarray(t),
                               {"low_res": jnp.asarray(low)})
    got = np.asarray(got).transpose(0, 3, 1, 2)
    print(f"upsampler parity: max rel diff {rel(got, want):.2e}")
    assert rel(got, want) <= 1e-4


@pytest.mark.parity
def test_convert_checkpoint_from_saved_pipeline_folder(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import PriorTransformer, UNet2DModel

    src = tmp_path / "karlo"
    _randomise(torch, PriorTransformer(**PRIOR_CFG), 0).save_pretrained(src / "prior")
    unet, tp = _decoder_ref(torch)
    unet.save_pretrained(src / "decoder")
    tp.save_pretrained(src / "text_proj")
    for i, name in enumerate(("super_res_first", "super_res_last")):
        _randomise(torch, UNet2DModel(**SR_CFG), 10 + i).save_pretrained(src / name)
    (src / "prior_scheduler").mkdir()
    (src / "prior_scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"clip_sample": True, "clip_sample_range": 5.0}))
    out = karlo.convert_checkpoint(src, tmp_path / "out", context_length=5)
    sampler = runs.load_prior(out / "prior")
    assert sampler.cfg.clip_sample_range == 5.0 and sampler.cfg.context_length == 7
    params, cfg = runs.load_decoder(out / "decoder")
    assert cfg.clip_text_width == 12
    np.testing.assert_array_equal(params["null_image_emb"],
                                  tp.learned_classifier_free_guidance_embeddings.detach().numpy())
    for name in ("super_res_first", "super_res_last"):
        _, ucfg = runs.load_upsampler(out / name)
        assert ucfg.time_shift == "add" and ucfg.low_res_resize == "cubic"
        assert ucfg.last_step == (name == "super_res_last")


def test_karlo_timesteps_match_unclip_scheduler_rule():
    # round(k · 999 / 24), k = 0 … 24, both ends included.
    ts = karlo.karlo_timesteps(25)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 25
    np.testing.assert_array_equal(ts[:4], [0, 42, 83, 125])
    sched = karlo.karlo_schedule(25)
    np.testing.assert_array_equal(np.asarray(sched.timesteps), ts)
    with pytest.raises(ValueError, match="num_steps must be in \\[2, 1000\\], got 1"):
        karlo.karlo_timesteps(1)


# ----------------------------------------------------------------------------- sampler parity


class _NoiseQueue:
    """Stands in for diffusers' ``randn_tensor`` inside the scheduler: hands out, in order, the
    exact per-step noise our sampler draws (``normal(fold_in(rng_steps, i))``)."""

    def __init__(self, torch, noises):
        self.torch, self.noises = torch, list(noises)

    def __call__(self, shape, **kw):
        z = self.noises.pop(0)
        assert tuple(z.shape) == tuple(shape)
        return self.torch.from_numpy(np.array(z, np.float32))


def _float64(sched):
    """The reference scheduler with its constants in float64. In float32 its last step's
    ``1 − ᾱ₀`` cancels (β₀ ≈ 4e-5, ~1e-3 rel. error), scaling the final x̂₀ by ≈ 1.0005:
    an artefact of the reference's arithmetic (ours derives every coefficient in float64)."""
    import torch

    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = sched.one.double()
    return sched


def _our_noises(key, shape, n, to_torch_layout=lambda z: z):
    """Our sampler's noise for steps i = n-1 … 1 (the order the reference loop asks for it;
    the last step, t = 0, adds none)."""
    _, rng_steps = jax.random.split(key)
    return [to_torch_layout(np.asarray(jax.random.normal(jax.random.fold_in(rng_steps, i),
                                                         shape, jnp.float32)))
            for i in range(n - 1, 0, -1)]


@pytest.mark.parity
def test_parity_guided_prior_sampling_with_unclip_scheduler(monkeypatch):
    """The whole guided prior chain (DDPM, x₀ prediction, ±clip, 6 Karlo steps) of our shared
    sampler vs the pipeline's loop over ``UnCLIPScheduler``; same x_T, same per-step noise
    (the scheduler's ``randn_tensor`` replaced by our draws), same model weights."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import PriorTransformer, UnCLIPScheduler
    from diffusers.schedulers import scheduling_unclip

    from unclip_jax.core import diffusion
    from unclip_jax.models import prior as P

    ref = _randomise(torch, PriorTransformer(**PRIOR_CFG), 0)
    cfg, params = karlo.convert_prior(dict(ref.config), _state(ref), clip_sample_range=1.5)
    n, b, scale = 6, 2, 4.0
    rng = np.random.default_rng(5)
    emb, states = (rng.normal(size=(b, 12)).astype(np.float32),
                   rng.normal(size=(b, 7, 12)).astype(np.float32))
    mask = np.arange(7)[None] < np.array([7, 3])[:, None]
    # The "empty caption" branch: its own embedding/states, 2 valid tokens.
    u_emb, u_states = (rng.normal(size=(b, 12)).astype(np.float32),
                       rng.normal(size=(b, 7, 12)).astype(np.float32))
    u_mask = np.arange(7)[None] < 2
    u_mask = np.broadcast_to(u_mask, (b, 7))
    key = jax.random.PRNGKey(3)
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (b, 12)))
    ours = diffusion.sample(
        P.make_denoiser(P.DiffusionPrior(cfg)), params, schedule=karlo.karlo_schedule(n),
        rng=key, x_T=jnp.asarray(x_T), cond={"text_emb": emb, "text_states": states,
                                             "text_mask": mask},
        uncond={"text_emb": u_emb, "text_states": u_states, "text_mask": u_mask},
        method="ddpm", guidance_scale=scale, model_output="x0", variance="fixed_small",
        clip_x0=P.clip_range(cfg))

    monkeypatch.setattr(scheduling_unclip, "randn_tensor",
                        _NoiseQueue(torch, _our_noises(key, (b, 12), n)))
    sched = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                            clip_sample=True, clip_sample_range=1.5)
    sched = _float64(sched)
    sched.set_timesteps(n)
    T = torch.from_numpy
    latents = T(x_T.copy())
    with torch.no_grad():
        ts = sched.timesteps
        for i, t in enumerate(ts):
            out = ref(torch.cat([latents] * 2), timestep=t,
                      proj_embedding=T(np.concatenate([u_emb, emb])),
                      encoder_hidden_states=T(np.concatenate([u_states, states])),
                      attention_mask=T(np.concatenate([u_mask, mask]))
                      ).predicted_image_embedding
            un, te = out.chunk(2)
            out = un + scale * (te - un)
            prev = None if i + 1 == len(ts) else ts[i + 1]
            latents = sched.step(out, timestep=t, sample=latents, prev_timestep=prev).prev_sample
        want = ref.post_process_latents(latents).numpy()
    got = np.asarray(P.from_model_space(cfg, ours))
    print(f"guided prior sampling parity ({n} steps): max rel diff {rel(got, want):.2e}")
    assert rel(got, want) <= 1e-4


@pytest.mark.parity
def test_parity_guided_decoder_sampling_with_unclip_scheduler(monkeypatch):
    """The guided decoder chain (ε prediction, learned-range variance from the conditional
    half, x̂₀ clipped to ±1, 4 Karlo steps) of our sampler vs ``UnCLIPScheduler``; the
    unconditional branch uses the learned null image embedding, as the pipeline does."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import torch.nn.functional as F
    from diffusers import UnCLIPScheduler
    from diffusers.schedulers import scheduling_unclip

    from unclip_jax.core import diffusion
    from unclip_jax.models import decoder as D

    unet, tp = _decoder_ref(torch)
    cfg, params = karlo.convert_decoder(dict(unet.config), _state(unet), dict(tp.config),
                                        _state(tp), context_length=5)
    n, b, scale = 4, 2, 3.0
    rng = np.random.default_rng(6)
    img = rng.normal(size=(b, 12)).astype(np.float32)
    temb, states = (rng.normal(size=(b, 12)).astype(np.float32),
                    rng.normal(size=(b, 5, 12)).astype(np.float32))
    mask = np.arange(5)[None] < np.array([5, 3])[:, None]
    u_temb, u_states = (rng.normal(size=(b, 12)).astype(np.float32),
                        rng.normal(size=(b, 5, 12)).astype(np.float32))
    u_mask = np.broadcast_to(np.arange(5)[None] < 2, (b, 5))
    null = np.broadcast_to(params["null_image_emb"], (b, 12))
    key = jax.random.PRNGKey(7)
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(8), (b, 16, 16, 3)))
    ours = diffusion.sample(
        D.make_denoiser(cfg), params, schedule=karlo.karlo_schedule(n), rng=key,
        x_T=jnp.asarray(x_T),
        cond={"image_emb": img, "clip_text": {"emb": temb, "states": states, "valid": mask}},
        uncond={"image_emb": null, "clip_text": {"emb": u_temb, "states": u_states,
                                                 "valid": u_mask}},
        method="ddpm", guidance_scale=scale, model_output="eps", variance="learned",
        clip_x0=(-1.0, 1.0))

    nchw = lambda z: z.transpose(0, 3, 1, 2)  # noqa: E731
    monkeypatch.setattr(scheduling_unclip, "randn_tensor",
                        _NoiseQueue(torch, _our_noises(key, (b, 16, 16, 3), n, nchw)))
    sched = UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                            clip_sample=True, clip_sample_range=1.0)
    sched = _float64(sched)
    sched.set_timesteps(n)
    T = torch.from_numpy
    latents = T(nchw(x_T).copy())
    with torch.no_grad():
        hidden, additive = tp(image_embeddings=T(img), prompt_embeds=T(np.concatenate(
            [u_temb, temb])), text_encoder_hidden_states=T(np.concatenate([u_states, states])),
            do_classifier_free_guidance=True)
        attn_mask = F.pad(T(np.concatenate([u_mask, mask])), (4, 0), value=True)
        ts = sched.timesteps
        for i, t in enumerate(ts):
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=hidden,
                       class_labels=additive, attention_mask=attn_mask).sample
            un, te = out.chunk(2)
            un, _ = un.split(3, dim=1)
            te, var = te.split(3, dim=1)
            out = torch.cat([un + scale * (te - un), var], dim=1)
            prev = None if i + 1 == len(ts) else ts[i + 1]
            latents = sched.step(out, t, latents, prev_timestep=prev).prev_sample
    want = latents.numpy()
    got = nchw(np.asarray(ours))
    print(f"guided decoder sampling parity ({n} steps): max rel diff {rel(got, want):.2e}")
    assert rel(got, want) <= 1e-4
