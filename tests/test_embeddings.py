"""The CLIP embedding cache: contents, round trip, resume, partial shards, clear errors."""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from unclip_jax.core import config as config_lib
from unclip_jax.train import embeddings, runs
from unclip_jax.models.clip import CLIP, dummy_inputs
from unclip_jax.train.checkpoint import Checkpointer

from tiny import SHAPES_RES as RES
from tiny import SHAPES_SIZES, TINY_CLIP

N_TEST = SHAPES_SIZES["num_test"]                  # 8 (the shared dataset: 32 / 8 / 8 at 16 px)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, shapes_data, shapes_tokenizer):
    """The shared tiny dataset and tokenizer, and a tiny random CLIP (at the data's 16 px)
    saved as a run."""
    root = tmp_path_factory.mktemp("emb")
    data_cfg, tok = shapes_data, shapes_tokenizer
    shutil.copyfile(tok.path, root / "tok.model")
    cfg = dataclasses.replace(TINY_CLIP, image_size=RES, patch_size=8,
                              vocab_size=tok.vocab_size)
    params = nn.meta.unbox(jax.jit(CLIP(cfg).init)(jax.random.PRNGKey(0),
                                                   *dummy_inputs(cfg, 2).values())["params"])
    workdir = root / "clip"
    run_cfg = {"model": config_lib.to_dict(cfg), "data": config_lib.to_dict(data_cfg),
               "train": {"ema_decay": 0.0}}
    run_cfg["data"]["tokenizer"] = str(root / "tok.model")
    ck = Checkpointer(workdir, async_save=False)
    ck.save(7, {"params": params}, {"position": 0}, run_cfg)
    ck.close()
    (workdir / "config.json").write_text(json.dumps(run_cfg))
    return workdir, data_cfg, cfg, params, tok


def test_cache_round_trip(clip_run, tmp_path):
    workdir, data_cfg, cfg, params, tok = clip_run
    out = embeddings.cache_embeddings(workdir, data_cfg, "test", tmp_path, batch_size=2,
                                      shard_size=4, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard_00000.npz", "shard_00001.npz"]
    d = embeddings.load_split(tmp_path, "test")
    assert d["text_emb"].shape == d["image_emb"].shape == (N_TEST, 8)
    assert d["text_emb"].dtype == np.float32 and d["text_states"].dtype == np.float16
    assert d["text_states"].shape == (N_TEST, 12, 16) and d["text_tokens"].dtype == np.int32
    np.testing.assert_array_equal(d["index"], np.arange(N_TEST))
    assert d["caption"].dtype.kind == "U" and d["colour"].shape == (N_TEST, 2)
    for k in ("shape", "size", "num_objects", "relation"):
        assert k in d
    np.testing.assert_allclose(np.linalg.norm(d["image_emb"], axis=-1), 1.0, rtol=1e-5)
    # The stored values are the CLIP's (its EOS embedding and final-LN states).
    model = CLIP(cfg)
    tokens = tok.encode(list(d["caption"]), 12)
    np.testing.assert_array_equal(d["text_tokens"], tokens)
    states, temb = model.apply({"params": params}, tokens, method=model.encode_text_tokens)
    np.testing.assert_allclose(d["text_emb"], temb, atol=1e-5)
    np.testing.assert_allclose(d["text_states"], np.asarray(states, np.float16), atol=1e-2)
    meta = embeddings.read_meta(tmp_path)
    assert (meta["clip_step"], meta["embed_dim"], meta["context_length"],
            meta["text_width"], meta["shard_size"]) == (7, 8, 12, 16, 4)
    assert meta["splits"]["test"] == {"count": N_TEST, "num_shards": 2}
    # Loaded with allow_pickle=False: no object arrays anywhere.
    with np.load(out / "shard_00000.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_resume_skips_complete_shards_and_never_loads_a_partial_one(clip_run, tmp_path):
    workdir, data_cfg, *_ = clip_run
    split_dir = embeddings.cache_embeddings(workdir, data_cfg, "test", tmp_path, batch_size=2,
                                            shard_size=4, progress=False)
    first = split_dir / "shard_00000.npz"
    second = split_dir / "shard_00001.npz"
    # A killed run: the second shard never got its final name, only a temporary file.
    os.replace(second, split_dir / f".shard_00001.npz.tmp-{os.getpid()}")
    (split_dir / ".shard_00001.npz.tmp-1").write_bytes(b"half a zip")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        embeddings.load_split(tmp_path, "test")
    stamp = first.stat().st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))
    embeddings.cache_embeddings(workdir, data_cfg, "test", tmp_path, batch_size=2,
                                shard_size=4, progress=False)
    assert first.stat().st_mtime_ns == stamp - 10**9          # complete shard skipped
    assert second.is_file()
    assert len(embeddings.load_split(tmp_path, "test")["index"]) == N_TEST


def test_mismatching_cache_and_bad_sizes_are_errors(clip_run, tmp_path):
    workdir, data_cfg, *_ = clip_run
    embeddings.cache_embeddings(workdir, data_cfg, "test", tmp_path, batch_size=2,
                                shard_size=4, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        embeddings.cache_embeddings(workdir, data_cfg, "test", tmp_path, batch_size=2,
                                    shard_size=8, progress=False)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        embeddings.cache_embeddings(workdir, data_cfg, "test", tmp_path, batch_size=3,
                                    shard_size=4, progress=False)
    with pytest.raises(FileNotFoundError, match="no split 'train'"):
        embeddings.load_split(tmp_path, "train")


def test_missing_clip_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs.load_clip(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        embeddings.cache_embeddings(tmp_path, None, "train", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no embedding cache"):
        embeddings.load_split(tmp_path / "out", "train")


def test_load_clip_rebuilds_the_saved_model(clip_run):
    workdir, data_cfg, cfg, params, tok = clip_run
    clip = runs.load_clip(workdir)
    model, got, got_cfg = clip.module, clip.params, clip.config
    assert got_cfg == cfg
    img = np.zeros((1, RES, RES, 3), np.float32)
    np.testing.assert_allclose(model.apply({"params": got}, img, method=model.encode_image),
                               CLIP(cfg).apply({"params": params}, img,
                                               method=CLIP(cfg).encode_image), atol=1e-6)


# ---------------------------------------------------------------------------- the decoder's cache


def _decoder_task(clip_run, workdir, **model):
    import dataclasses

    import flax.linen as nn

    from unclip_jax.core.config import ExperimentConfig, TrainConfig
    from unclip_jax.models import decoder as D
    from unclip_jax.core.sharding import MeshConfig
    from unclip_jax.train import tasks

    clip_dir, data_cfg, *_ = clip_run
    dcfg = D.DecoderConfig(clip_workdir=str(clip_dir), base_channels=8, channel_mult=(1,),
                           num_res_blocks=1, attention_resolutions=(16,), head_channels=8,
                           num_timesteps=50, model_output="v", groups=4, **model)
    data = dataclasses.replace(data_cfg, tokenizer=str(clip_dir.parent / "tok.model"))
    exp = ExperimentConfig(name="d", task="decoder", model=dcfg, data=data,
                           train=TrainConfig(batch_size=8, steps=2), mesh=MeshConfig(data=1))
    cfg, task = tasks.build_task(exp, workdir)
    params = nn.meta.unbox(task.init(jax.random.PRNGKey(0), task.example))["params"]
    return cfg, task, params


def test_decoder_on_cached_embeddings_equals_embedding_every_step(clip_run, tmp_path):
    """model.embeddings_dir: the loader joins each example's cached CLIP image embedding (the
    cache is built from the decoder's CLIP when missing) and the loss equals the loss that runs
    the frozen image tower on the batch."""
    cache = tmp_path / "cache"
    _, plain, params = _decoder_task(clip_run, tmp_path / "a")
    cfg, cached, _ = _decoder_task(clip_run, tmp_path / "b", embeddings_dir=str(cache))
    assert embeddings.read_meta(cache)["splits"]["train"]["count"] == 32
    a, b = next(plain.batches(5, None)), next(cached.batches(5, None))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert "image_emb" not in a and b["image_emb"].shape == (8, 8)
    rng = jax.random.PRNGKey(3)
    la, ma = plain.loss(params, a, rng)
    lb, mb = cached.loss(params, b, rng)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    np.testing.assert_allclose(float(mb["mse"]), float(ma["mse"]), rtol=1e-5)


def test_decoder_cache_of_another_clip_or_augmented_images_is_an_error(clip_run, tmp_path):
    cache = tmp_path / "cache"
    _decoder_task(clip_run, tmp_path / "a", embeddings_dir=str(cache))
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(dict(meta, clip_workdir="/elsewhere/clip")))
    with pytest.raises(ValueError, match="made by the CLIP '/elsewhere/clip'.*accepted: a "
                                         "cache of model.clip_workdir's CLIP"):
        _decoder_task(clip_run, tmp_path / "b", embeddings_dir=str(cache))
    import dataclasses

    from unclip_jax.train.tasks import decoder as decoder_task

    with pytest.raises(ValueError, match="random_crop / data.colour_drop change the images"):
        decoder_task.cached_image_embeddings(str(cache), str(clip_run[0]),
                                              dataclasses.replace(clip_run[1], random_crop=True))


def test_row_features_join_by_source_row(clip_run):
    from unclip_jax.data import input_pipeline

    _, data_cfg, *_ = clip_run
    rows = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    it = input_pipeline.make_batches(data_cfg, "train", batch_size=8, train=True,
                                     row_features={"extra": rows})
    plain = input_pipeline.make_batches(data_cfg, "train", batch_size=8, train=True)
    for i in (0, 4, 9):                                  # several epochs: shuffled orders
        b = it.local_numpy(i)
        flat = np.arange(i * 8, (i + 1) * 8)
        idx = [plain.permutation(int(k // 32))[k % 32] for k in flat]
        np.testing.assert_array_equal(b["extra"], rows[idx])
        np.testing.assert_array_equal(b["image"], plain.local_numpy(i)["image"])
    with pytest.raises(ValueError, match="row feature 'extra' has 5 rows; the data source has "
                                         "32 examples"):
        input_pipeline.make_batches(data_cfg, "train", batch_size=8, train=True,
                                    row_features={"extra": rows[:5]})
