"""Sample grids during training: a tiny decoder trained on webdataset shards writes, every
``train.sample_every`` steps, a PNG and a TensorBoard image of exactly what the shared sampler
gives for its params; other tasks refuse the setting."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from unclip_jax import config as config_lib
from unclip_jax.config import DataConfig
from unclip_jax.images import image_grid
from unclip_jax.models.clip import CLIP, dummy_inputs
from unclip_jax.sharding import MeshConfig
from unclip_jax.text import Tokenizer
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

    from unclip_jax.models import decoder as D

    root, data, clip_dir = setup
    cfg, task = tasks.build_task(decoder_cfg(data, clip_dir), tmp_path)
    state = loop.train(cfg, task, tmp_path, progress=False)
    pngs = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert pngs == ["decoder_0000002.png", "decoder_0000004.png"]
    grid = np.asarray(Image.open(tmp_path / "samples" / "decoder_0000004.png"))
    assert grid.shape == (2 * RES, 4 * RES, 3)
    # row 0: the first 4 evaluation images; row 1: the sampler's output for the final params
    # (what models.decoder.sample_images gives for the same embeddings, captions and seed)
    val = tasks.input_pipeline.make_batches(cfg.data, "validation", batch_size=4,
                                            tokenizer=Tokenizer.load(data.tokenizer),
                                            train=False).local_numpy(0)
    clip_model, clip_params, _ = D.load_frozen_clip(clip_dir)
    emb = D.clip_image_embedder(clip_model, clip_params, RES)(val["image"])
    want = D.sample_images(jax.device_get(state.params), cfg.model, emb,
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
    with pytest.raises(ValueError, match="sample grids during training exist for decoder"):
        tasks.build_task(cfg, tmp_path)
