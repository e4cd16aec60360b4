"""What each model supplies to the generic loop: ``build_task(cfg, workdir) -> (cfg, Task)``.

A task fixes the pieces of the config that follow from the data (vocabulary size and special
token ids from the tokenizer, input resolution and context length from the data config), so
the config saved with the checkpoint is the one the model was really built with.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from pathlib import Path

import jax
import numpy as np

from unclip_jax import input_pipeline, sharding
from unclip_jax.config import DataConfig, ExperimentConfig
from unclip_jax.text import Tokenizer, train_tokenizer_from_dataset
from unclip_jax.train.loop import Task


def ensure_dataset(data_cfg: DataConfig) -> None:
    """Build ``captioned_shapes/r<N>`` on first use (it is procedural); other datasets must
    already be prepared (``open_source`` says how when they are not). Several processes:
    process 0 builds it (into the shared ``data_dir``) while the others wait. Webdataset
    shards (``data.shards``) are read as they are: nothing to build."""
    if data_cfg.shards or data_cfg.name.partition("/")[0] != "captioned_shapes":
        return
    resolution = _shapes_to_build(data_cfg)      # every process: the same error, if any
    if resolution is not None and sharding.is_main_process():
        _build_shapes(data_cfg, resolution)
    sharding.barrier(f"dataset {data_cfg.name}")


def _shapes_to_build(data_cfg: DataConfig) -> int | None:
    """The resolution of a ``captioned_shapes/r<N>`` that is not built yet (None: nothing to
    build, or not captioned_shapes); FileNotFoundError for a missing one of another name."""
    family, _, config = data_cfg.name.partition("/")
    if family != "captioned_shapes" or data_cfg.shards:
        return None
    try:
        input_pipeline.dataset_dir(data_cfg.name, data_cfg.data_dir)
        return None
    except FileNotFoundError:
        match = re.fullmatch(r"r(\d+)", config)
        if not match:
            raise
    return int(match.group(1))


def _build_shapes(data_cfg: DataConfig, resolution: int) -> None:
    from unclip_jax.datasets.captioned_shapes import build_captioned_shapes

    print(f"building {data_cfg.name} into {data_cfg.data_dir} ...", flush=True)
    build_captioned_shapes(data_cfg.data_dir, resolution=resolution)


def tokenizer_path(data_cfg: DataConfig, workdir: str | Path) -> Path:
    return Path(data_cfg.tokenizer) if data_cfg.tokenizer else Path(workdir) / "tokenizer.model"


def ensure_tokenizer(data_cfg: DataConfig, workdir: str | Path) -> Tokenizer:
    """Load the configured tokenizer, training it on the train split's captions if missing.

    Several processes: process 0 trains it (into the shared workdir), the others wait."""
    path = tokenizer_path(data_cfg, workdir)
    if data_cfg.tokenizer and not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} (data.tokenizer) does not exist; "
                                "train one with `unclip-jax tokenizer train` or leave "
                                "data.tokenizer empty to train it in the workdir")
    if sharding.is_main_process() and not path.is_file():
        resolution = _shapes_to_build(data_cfg)
        if resolution is not None:
            _build_shapes(data_cfg, resolution)
        _train_tokenizer(data_cfg, path)
    sharding.barrier(f"tokenizer {path}")
    if not path.is_file():
        raise FileNotFoundError(f"process {jax.process_index()} cannot see the tokenizer "
                                f"{str(path)!r} that process 0 wrote: every process needs the "
                                f"same --workdir on a file system all hosts share (or "
                                f"data.tokenizer on one)")
    return Tokenizer.load(path)


TOKENIZER_CAPTIONS = 200_000    # captions a tokenizer is trained on (at most)


def _train_tokenizer(data_cfg: DataConfig, path: Path) -> Tokenizer:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data_cfg.shards:           # the first captions of the shards, in order (no index)
        from unclip_jax.datasets import shards

        print(f"training a {data_cfg.vocab_size}-token BPE tokenizer on the captions of "
              f"{data_cfg.shards} → {path}", flush=True)
        urls = input_pipeline.shard_urls(data_cfg, "train")
        return Tokenizer.train(shards.iter_captions(urls, TOKENIZER_CAPTIONS), path,
                               data_cfg.vocab_size)
    print(f"training a {data_cfg.vocab_size}-token BPE tokenizer on {data_cfg.name} → {path}",
          flush=True)
    return train_tokenizer_from_dataset(input_pipeline.open_source(data_cfg, "train"), path,
                                        data_cfg.vocab_size, max_captions=TOKENIZER_CAPTIONS)


def _shapes_caption(example: dict, rng, p: float) -> str:
    from unclip_jax import shapes

    return shapes.partial_caption(example, rng, p)


def clip_task(cfg: ExperimentConfig, workdir: str | Path) -> tuple[ExperimentConfig, Task]:
    from unclip_jax.eval import shapes_eval, zero_shot
    from unclip_jax.models import clip

    if cfg.data.shards and not cfg.data.eval_shards and (cfg.train.eval_every
                                                         or cfg.train.eval_at_end):
        raise ValueError("the CLIP evaluation (retrieval on the validation split) reads "
                         "data.eval_shards when data.shards is set, and it is empty; set "
                         "data.eval_shards to held-out shards, or train.eval_every=0 "
                         "train.eval_at_end=false")
    ensure_dataset(cfg.data)
    tok = ensure_tokenizer(cfg.data, workdir)
    model_cfg = dataclasses.replace(
        cfg.model, vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id,
        context_length=cfg.data.context_length, image_size=cfg.data.image_size)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    model = clip.CLIP(model_cfg)
    tokenize = lambda texts: tok.encode(texts, cfg.data.context_length)  # noqa: E731

    caption_fn = None
    if cfg.data.caption_augment > 0:
        if not cfg.data.name.startswith("captioned_shapes"):
            raise ValueError("data.caption_augment applies to captioned_shapes only, not "
                             f"{cfg.data.name!r}")
        caption_fn = functools.partial(_shapes_caption, p=cfg.data.caption_augment)
    example_fn = None
    if cfg.data.colour_drop:
        if not cfg.data.name.startswith("captioned_shapes"):
            raise ValueError("data.colour_drop applies to captioned_shapes only, not "
                             f"{cfg.data.name!r}")
        from unclip_jax import augment

        example_fn = functools.partial(augment.colour_drop, p=cfg.data.colour_drop)

    def batches(start, mesh):
        return input_pipeline.make_batches(cfg.data, "train", batch_size=cfg.train.batch_size,
                                           tokenizer=tok, mesh=mesh, train=True, start=start,
                                           caption_fn=caption_fn, example_fn=example_fn)

    def evaluate(state, step) -> dict:
        params = state.ema_params if cfg.train.ema_decay > 0 else state.params
        out = {}
        # Retrieval on validation: image→text top-1 within batches of the training size.
        # every process reads the whole evaluation batch (the same numpy on each, so jit sees
        # one replicated input); the embeddings, split over the mesh, are gathered by fetch
        val = input_pipeline.make_batches(cfg.data, "validation",
                                          batch_size=cfg.train.batch_size, tokenizer=tok,
                                          train=False, process_index=0, process_count=1)
        hits, n = 0.0, 0
        for i, b in zip(range(4), val):
            img = zero_shot.encode_images(model, params, b["image"])
            txt = zero_shot.encode_texts(model, params, b["tokens"])
            keep = np.asarray(b["mask"])
            pred = np.argmax(img[keep] @ txt[keep].T, axis=1)
            hits += float(np.sum(pred == np.arange(keep.sum())))
            n += int(keep.sum())
        out["val_i2t_top1"] = hits / max(n, 1)
        if cfg.data.name.startswith("captioned_shapes") and not cfg.data.shards:
            out.update(shapes_eval.zero_shot_accuracy(model, params, tokenize,
                                                      image_size=cfg.data.image_size))
        return out

    task = Task(
        init=lambda rng, b: model.init(rng, b["image"], b["tokens"]),
        loss=lambda params, batch, rng: clip.loss_fn(model, params, batch, rng),
        batches=batches,
        example=clip.dummy_inputs(model_cfg, cfg.train.batch_size),
        evaluate=evaluate,
    )
    return cfg, task


# Task name -> "module:function" building it (imported on use, so a model's code loads only when
# that model is trained). Each function has the signature of ``clip_task``.
TASKS = {
    "clip": "unclip_jax.train.tasks:clip_task",
    "prior": "unclip_jax.models.prior:make_task",
    "prior_ar": "unclip_jax.models.prior_ar:make_task",
    "decoder": "unclip_jax.models.decoder:make_task",
    "upsampler": "unclip_jax.models.decoder:make_upsampler_task",
    "dvae": "unclip_jax.models.dvae:make_task",
    "dalle": "unclip_jax.models.dalle:make_task",
}


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """``uint8 [R·S, N·S, 3]`` of ``R`` rows of ``N`` images ``[N, S, S, 3]`` in [-1, 1]."""
    out = [np.concatenate(list(np.asarray(r, np.float32)), axis=1) for r in rows]
    return np.clip(np.rint((np.concatenate(out, axis=0) + 1) * 127.5), 0, 255).astype(np.uint8)


def decoder_sample_grid(cfg: ExperimentConfig, workdir: str | Path):
    """``(state, step) -> {"decoder": grid}``: the decoder's samples from the CLIP image
    embeddings (and captions) of the first ``train.sample_count`` validation images, with a
    fixed seed (``train.seed``) and the model's own sampling settings (``sample_steps``,
    guidance), through ``models.decoder.sample_images`` (the shared jitted sampler the
    pipelines use) with the batch sharded as the training batch is. Grid rows: the validation
    images, then the samples (EMA params when the run keeps them)."""
    from unclip_jax.models import decoder as D

    mcfg, n = cfg.model, cfg.train.sample_count
    clip_model, clip_params, _ = D.load_frozen_clip(mcfg.clip_workdir)
    tok = Tokenizer.load(tokenizer_path(cfg.data, workdir))
    val = input_pipeline.make_batches(cfg.data, "validation", batch_size=n, tokenizer=tok,
                                      train=False, process_index=0, process_count=1)
    batch = val.local_numpy(0)                        # the same rows on every process
    images, tokens = batch["image"], batch["tokens"]
    emb = np.asarray(jax.jit(D.clip_image_embedder(clip_model, clip_params,
                                                   mcfg.clip_image_size))(images))
    clip_text = uncond_text = None
    if mcfg.clip_text_width > 0:
        encode = D.clip_text_encoder(clip_model, clip_params)
        clip_text = jax.tree.map(np.asarray, encode(tokens))
        uncond_text = jax.tree.map(np.asarray, D.batched(
            D.empty_clip_text(encode, tok, mcfg.context_length), n))
    mesh = sharding.make_mesh(cfg.mesh)
    split = n % sharding.batch_divisor(mesh) == 0

    def place(tree):
        if not split:
            return tree
        return sharding.from_host(tree, lambda ndim: sharding.batch_sharding(mesh, ndim))

    def samples(state, step) -> dict:
        params = state.ema_params if cfg.train.ema_decay > 0 else state.params
        out = D.sample_images(params, mcfg, place(emb),
                              place(tokens) if mcfg.use_text else None,
                              rng=jax.random.PRNGKey(cfg.train.seed),
                              clip_text=place(clip_text) if clip_text is not None else None,
                              uncond_clip_text=(place(uncond_text) if uncond_text is not None
                                                else None))
        return {"decoder": image_grid([images, sharding.fetch(out)])}

    return samples


# Task name -> "module:function" building its sample grids, ``(cfg, workdir) -> samples`` (the
# Task's ``samples`` field), for the tasks that have them.
SAMPLE_GRIDS = {"decoder": "unclip_jax.train.tasks:decoder_sample_grid"}


def build_task(cfg: ExperimentConfig, workdir: str | Path) -> tuple[ExperimentConfig, Task]:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; accepted: {', '.join(sorted(TASKS))}")
    if cfg.train.sample_every and cfg.task not in SAMPLE_GRIDS:
        raise ValueError(f"train.sample_every: sample grids during training exist for "
                         f"{', '.join(sorted(SAMPLE_GRIDS))}, not {cfg.task!r}; set "
                         f"train.sample_every=0")
    if cfg.train.sample_every < 0 or cfg.train.sample_count < 1:
        raise ValueError(f"train.sample_every ≥ 0 and train.sample_count ≥ 1 are accepted, "
                         f"got {cfg.train.sample_every} and {cfg.train.sample_count}")
    module, _, fn = TASKS[cfg.task].partition(":")
    cfg, task = getattr(importlib.import_module(module), fn)(cfg, workdir)
    if cfg.train.sample_every and task.samples is None:
        module, _, fn = SAMPLE_GRIDS[cfg.task].partition(":")
        task = dataclasses.replace(
            task, samples=getattr(importlib.import_module(module), fn)(cfg, workdir))
    return cfg, task
