"""Sample grids during training: tiny generators trained on webdataset shards (decoder,
upsampler, DALL·E; the diffusion prior through a decoder) write, every ``train.sample_every``
steps, a PNG and a TensorBoard image of exactly what their sampler gives for the params; other
tasks refuse the setting."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from unclip_jax.core import config as config_lib
from unclip_jax.data import input_pipeline
from unclip_jax.train import runs
from unclip_jax.core.config import DataConfig
from unclip_jax.core.images import image_grid
from unclip_jax.models.clip import CLIP, dummy_inputs
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.core.text import Tokenizer
from unclip_jax.train import loop, tasks
from unclip_jax.train.checkpoint import Checkpointer

from tiny import TINY_CLIP

RES = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shapes_tokenizer):
    """Shards (train + eval), the shared tokenizer, and a tiny random CLIP saved as a run."""
    import test_webdataset as wds

    root = tmp_path_factory.mktemp("grids")
    for s in range(3):
        files = {}
        for i in range(8):
            files.update(wds.members(s, i, "png"))
        wds.write_tar(root / f"{s:05d}.tar", files)
    tok = shapes_tokenizer
    data = DataConfig(name="grids", shards=str(root / "0000[01].tar"),
                      eval_shards=str(root / "00002.tar"), image_size=RES, context_length=8,
                      tokenizer=tok.path, shuffle_buffer=4)
    ccfg = dataclasses.replace(TINY_CLIP, image_size=RES, patch_size=8, context_length=8,
                               vocab_size=tok.vocab_size)
    params = nn.meta.unbox(jax.jit(CLIP(ccfg).init)(jax.random.PRNGKey(0),
                                                    *dummy_inputs(ccfg, 2).values())["params"])
    clip_dir = root / "clip"
    run_cfg = {"model": config_lib.to_dict(ccfg), "data": config_lib.to_dict(data),
               "train": {"ema_decay": 0.0}}
    ck = Checkpointer(clip_dir, async_save=False)
    ck.save(1, {"params": params}, {"position": 0}, run_cfg)
    ck.close()
    (clip_dir / "config.json").write_text(json.dumps(run_cfg))
    return root, data, clip_dir


def decoder_cfg(data, clip_dir, **train):
    from unclip_jax.models.decoder import DecoderConfig

    model = DecoderConfig(clip_workdir=str(clip_dir), base_channels=16, channel_mult=(1,),
                          num_res_blocks=1, attention_resolutions=(), head_channels=16,
                          context_dim=16, text_layers=1, text_width=16, text_heads=1,
                          sample_steps=2)
    base = dict(batch_size=4, steps=4, log_every=2, eval_every=0, eval_at_end=False,
                ckpt_every=4, sample_every=2, sample_count=4)
    base.update(train)
    return config_lib.ExperimentConfig(
        name="grid", model=model, task="decoder", data=data,
        train=config_lib.TrainConfig(**base),
        optim=config_lib.OptimConfig(learning_rate=1e-3, warmup_steps=1),
        mesh=MeshConfig(data=4, fsdp=1, model=1))


def test_decoder_grids_are_the_samplers_output(setup, tmp_path):
    from test_writers import read_events

    from unclip_jax.models import sampling as S

    root, data, clip_dir = setup
    cfg, task = tasks.build_task(decoder_cfg(data, clip_dir), tmp_path)
    state = loop.train(cfg, task, tmp_path, progress=False)
    pngs = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert pngs == ["decoder_0000002.png", "decoder_0000004.png"]
    grid = np.asarray(Image.open(tmp_path / "samples" / "decoder_0000004.png"))
    assert grid.shape == (2 * RES, 4 * RES, 3)
    # row 0: the first 4 evaluation images; row 1: the sampler's output for the final params
    # (what models.sampling.sample_images gives for the same embeddings, captions and seed)
    val = input_pipeline.make_batches(cfg.data, "validation", batch_size=4,
                                      tokenizer=Tokenizer.load(data.tokenizer),
                                      train=False).local_numpy(0)
    emb = runs.load_clip(clip_dir).embed_images(val["image"])
    want = S.sample_images(jax.device_get(state.params), cfg.model, emb,
                           val["tokens"] if cfg.model.use_text else None,
                           rng=jax.random.PRNGKey(cfg.train.seed))
    expect = image_grid([val["image"], np.asarray(want)])
    np.testing.assert_array_equal(grid[:RES], expect[:RES])
    assert np.abs(grid[RES:].astype(int) - expect[RES:]).max() <= 1   # 4 devices vs 1: rounding
    images = [(e.step, v.tag) for e in read_events(tmp_path / "tensorboard")
              for v in e.summary.value if v.WhichOneof("value") == "image"]
    assert images == [(2, "decoder"), (4, "decoder")]


def test_sample_every_is_refused_where_no_grid_exists(setup, tmp_path):
    root, data, clip_dir = setup
    cfg = dataclasses.replace(decoder_cfg(data, clip_dir), task="clip")
    with pytest.raises(ValueError, match="sample grids during training exist for dalle, "
                                         "decoder, prior, prior_ar, upsampler, not 'clip'"):
        tasks.build_task(cfg, tmp_path)


def _grid(workdir, name, step):
    return np.asarray(Image.open(workdir / "samples" / f"{name}_{step:07d}.png"))


def _train(cfg, workdir):
    cfg, task = tasks.build_task(cfg, workdir)
    return cfg, loop.train(cfg, task, workdir, progress=False)


def test_upsampler_grid_is_the_samplers_output(setup, tmp_path):
    from unclip_jax.models import decoder as D
    from unclip_jax.models import sampling as S

    root, data, clip_dir = setup
    model = D.UpsamplerConfig(low_res_size=RES // 2, base_channels=16, channel_mult=(1,),
                              num_res_blocks=1, sample_steps=2, crop_fraction=0.5)
    base = decoder_cfg(data, clip_dir)
    cfg, state = _train(dataclasses.replace(base, task="upsampler", model=model), tmp_path)
    grid = _grid(tmp_path, "upsampler", 4)
    real = input_pipeline.make_batches(cfg.data, "validation", batch_size=4,
                                       train=False).local_numpy(0)["image"]
    low = D.box_downsample(real, 2)
    want = S.upsample_images(jax.device_get(state.params), cfg.model, low,
                             rng=jax.random.PRNGKey(cfg.train.seed))
    expect = tasks.image_grid([np.repeat(np.repeat(low, 2, 1), 2, 2), want, real])
    assert grid.shape == expect.shape == (3 * RES, 4 * RES, 3)
    np.testing.assert_array_equal(grid[:RES], expect[:RES])
    np.testing.assert_array_equal(grid[2 * RES:], expect[2 * RES:])
    assert np.abs(grid[RES:2 * RES].astype(int) - expect[RES:2 * RES]).max() <= 1


def test_dalle_grid_is_the_samplers_output(setup, tmp_path):
    from unclip_jax.models import dalle as DL
    from unclip_jax.models import dvae as V

    root, data, clip_dir = setup
    vcfg = V.DVAEConfig(image_size=RES, num_groups=2, blocks_per_group=1, encoder_width=16,
                        decoder_width=16, decoder_init_width=8, vocab_size=32)
    vparams = nn.meta.unbox(V.DVAE(vcfg).init(jax.random.PRNGKey(1),
                                              np.zeros((1, RES, RES, 3), np.float32))["params"])
    run_cfg = {"model": config_lib.to_dict(vcfg), "train": {"ema_decay": 0.0}}
    ck = Checkpointer(tmp_path / "dvae", async_save=False)
    ck.save(1, {"params": vparams}, {"position": 0}, run_cfg)
    ck.close()
    (tmp_path / "dvae" / "config.json").write_text(json.dumps(run_cfg))
    model = DL.DalleConfig(dvae_workdir=str(tmp_path / "dvae"), width=16, depth=1, num_heads=2)
    base = decoder_cfg(data, clip_dir)
    cfg, state = _train(dataclasses.replace(base, task="dalle", model=model), tmp_path / "run")
    grid = _grid(tmp_path / "run", "dalle", 4)
    val = input_pipeline.make_batches(cfg.data, "validation", batch_size=4,
                                      tokenizer=Tokenizer.load(data.tokenizer),
                                      train=False).local_numpy(0)
    codes = DL.sample(cfg.model, jax.device_get(state.params), val["tokens"],
                      jax.random.PRNGKey(cfg.train.seed))
    want = V.decode(V.DVAE(vcfg), vparams, codes)
    expect = tasks.image_grid([val["image"], want])
    np.testing.assert_array_equal(grid[:RES], expect[:RES])
    assert np.abs(grid[RES:].astype(int) - expect[RES:]).max() <= 1


def test_prior_grid_renders_true_and_sampled_embeddings(setup, tmp_path):
    from unclip_jax.models import decoder as D
    from unclip_jax.models import sampling as S
    from unclip_jax.models import prior as P

    root, data, clip_dir = setup
    dec_cfg, _ = _train(decoder_cfg(data, clip_dir, sample_every=0), tmp_path / "decoder")
    prior = P.PriorConfig(clip_workdir=str(clip_dir), embeddings_dir=str(tmp_path / "emb"),
                          width=16, depth=1, num_heads=2, sample_steps=2)
    base = dataclasses.replace(decoder_cfg(data, clip_dir), task="prior", model=prior)
    with pytest.raises(ValueError, match="set train.sample_decoder to a trained decoder run"):
        tasks.build_task(base, tmp_path / "refused")
    cfg = dataclasses.replace(base, train=dataclasses.replace(
        base.train, sample_decoder=str(tmp_path / "decoder")))
    cfg, state = _train(cfg, tmp_path / "prior")
    grid = _grid(tmp_path / "prior", "prior", 4)
    from unclip_jax.train import embeddings

    val = {k: v[:4] for k, v in embeddings.load_split(tmp_path / "emb", "validation").items()}
    inputs = {k: val[k] for k in ("text_emb", "text_states", "text_tokens")}
    rng = jax.random.PRNGKey(cfg.train.seed)
    emb = S.PriorSampler(P.DiffusionPrior(cfg.model), jax.device_get(state.params))(inputs, rng)
    dec_params, dcfg = runs.load_decoder(tmp_path / "decoder")
    tokens = D.fit_tokens(val["text_tokens"], dcfg.context_length, dcfg.pad_id)
    want = S.sample_images(dec_params, dcfg, np.concatenate([val["image_emb"], emb]),
                           np.concatenate([tokens, tokens]), rng=jax.random.fold_in(rng, 1))
    expect = tasks.image_grid([want[:4], want[4:]])
    assert grid.shape == expect.shape == (2 * RES, 4 * RES, 3)
    assert np.abs(grid.astype(int) - expect).max() <= 1


# ----------------------------------------------------------------------------- train.evals


def test_generator_evals_on_closed_forms(setup):
    """The evaluators' wiring on known answers: samples equal to the real images give
    FD_CLIP 0 and the CLIP score of the real images; rendered scenes judged against their own
    captions score 1, against captions with another colour 0."""
    from unclip_jax.core import shapes
    from unclip_jax.train.eval import metrics
    from unclip_jax.train.tasks import evals

    root, data, clip_dir = setup
    real = np.random.default_rng(0).uniform(-1, 1, (6, RES, RES, 3)).astype(np.float32)
    caps = [f"sample 2 {i}" for i in range(6)]
    cfg = decoder_cfg(data, clip_dir, evals=("clip_score", "fd_clip"))
    out = evals.generator_evaluate(cfg, lambda state: evals.Generated(real.copy(), caps, real),
                                   str(clip_dir))(None, 0)
    frozen = runs.load_clip(clip_dir)
    feats = metrics.ClipFeatures(frozen.config, frozen.params, Tokenizer.load(data.tokenizer))
    assert out["fd_clip"] == pytest.approx(0.0, abs=1e-6)
    assert out["clip_score"] == pytest.approx(
        float(np.mean(metrics.clip_scores(feats.images(real), feats.texts(caps)))), rel=1e-5)

    scenes = [shapes.sample_scene(0, i, "test", num_objects=1) for i in range(8)]
    renders = np.stack([shapes.render(s, 64) for s in scenes]) / 127.5 - 1
    right = [shapes.caption(s) for s in scenes]
    # the same captions with every shape swapped for the next one: nothing right
    wrong = [c.replace(s.objects[0].shape, shapes.SHAPES[(shapes.SHAPES.index(
        s.objects[0].shape) + 1) % len(shapes.SHAPES)]) for c, s in zip(right, scenes)]
    shapes_cfg = dataclasses.replace(
        cfg, data=DataConfig(name="captioned_shapes/r64"),
        train=dataclasses.replace(cfg.train, evals=("shapes_judge",)))
    judged = {c is right: evals.generator_evaluate(
        shapes_cfg, lambda state, c=c: evals.Generated(renders, c), "")(None, 0)
        for c in (right, wrong)}
    assert judged[True]["shapes_judge/single_colour_shape"] == 1.0
    assert judged[False]["shapes_judge/single_colour_shape"] == 0.0


def test_decoder_evals_during_training(setup, tmp_path):
    """``train.evals`` replaces the decoder's evaluation: every eval step logs the chosen
    evaluators (on ``train.eval_count`` samples) and nothing else."""
    root, data, clip_dir = setup
    cfg = decoder_cfg(data, clip_dir, sample_every=0, eval_every=2, eval_at_end=True,
                      evals=("clip_score", "fd_clip"), eval_count=4)
    _train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evaluated] == [2, 4]
    for r in evaluated:
        assert {k for k in r if k.startswith("eval")} == {"eval/clip_score", "eval/fd_clip"}
        assert np.isfinite(r["eval/fd_clip"]) and 0 <= r["eval/clip_score"] <= 100


@pytest.mark.parametrize("task, train, data, message", [
    ("decoder", {"evals": ("fid",)}, {},
     "'fid' is not an evaluation of the 'decoder' task; accepted: clip_score, fd_clip, "
     "shapes_judge"),
    ("clip", {"evals": ("clip_score",)}, {},
     "'clip_score' is not an evaluation of the 'clip' task; accepted: retrieval, zero_shot"),
    ("dvae", {"evals": ("clip_score",)}, {},
     "the 'dvae' task has only its own evaluation"),
    ("decoder", {"evals": ("clip_score",), "eval_count": 0}, {},
     "train.eval_count is a number of samples ≥ 1, got 0"),
    ("decoder", {"evals": ("shapes_judge",)}, {},
     "shapes_judge reads captioned-shapes prompts, and the data is 'grids'"),
    ("clip", {"evals": ("zero_shot",)}, {},
     "zero_shot classifies captioned-shapes attributes, and the data is 'grids'"),
    ("upsampler", {"evals": ("fd_clip",)}, {},
     "the 'upsampler' model names none; set train.eval_clip to a trained CLIP run"),
])
def test_bad_evals_are_refused(setup, tmp_path, task, train, data, message):
    from unclip_jax.models import decoder as D
    from unclip_jax.models.clip import CLIPConfig as C

    root, setup_data, clip_dir = setup
    cfg = decoder_cfg(setup_data, clip_dir, sample_every=0, **train)
    model = {"decoder": cfg.model, "clip": C(embed_dim=8, patch_size=8, vision_width=16,
                                             vision_layers=1, vision_heads=2, text_width=16,
                                             text_layers=1, text_heads=2),
             "dvae": None, "upsampler": D.UpsamplerConfig(low_res_size=RES // 2,
                                                          base_channels=16, channel_mult=(1,),
                                                          num_res_blocks=1)}[task]
    cfg = dataclasses.replace(cfg, task=task, model=model)
    with pytest.raises(ValueError, match=message):
        tasks.build_task(cfg, tmp_path)


def test_grid_rows_that_do_not_split_over_the_devices(setup, tmp_path):
    """3 samples on a 4-device mesh: the rows are padded to 4 for the sampler and the grid
    shows the 3 asked for (the first 3 of what a 4-row call draws)."""
    from unclip_jax.models import sampling as S

    root, data, clip_dir = setup
    cfg, state = _train(decoder_cfg(data, clip_dir, steps=2, ckpt_every=2, sample_count=3),
                        tmp_path)
    grid = _grid(tmp_path, "decoder", 2)
    assert grid.shape == (2 * RES, 3 * RES, 3)
    val = input_pipeline.make_batches(cfg.data, "validation", batch_size=4,
                                      tokenizer=Tokenizer.load(data.tokenizer),
                                      train=False).local_numpy(0)
    rows = {k: np.concatenate([val[k][:3], val[k][2:3]]) for k in ("image", "tokens")}
    emb = runs.load_clip(clip_dir).embed_images(rows["image"])
    want = S.sample_images(jax.device_get(state.params), cfg.model, emb, rows["tokens"],
                           rng=jax.random.PRNGKey(cfg.train.seed))
    expect = tasks.image_grid([val["image"][:3], np.asarray(want)[:3]])
    assert np.abs(grid.astype(int) - expect).max() <= 1
