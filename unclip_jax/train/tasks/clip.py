"""The CLIP task: contrastive training on image–caption batches; the evaluation is image→text
retrieval on validation batches and, on captioned shapes, zero-shot colour/shape accuracy."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from unclip_jax.core.config import ExperimentConfig
from unclip_jax.data import input_pipeline
from unclip_jax.models import clip
from unclip_jax.train.eval import shapes_eval, zero_shot
from unclip_jax.train.loop import Task
from unclip_jax.train.tasks.common import ema_or_raw, ensure_dataset, ensure_tokenizer


def _shapes_caption(example: dict, rng, p: float) -> str:
    from unclip_jax.core import shapes

    return shapes.partial_caption(example, rng, p)


def clip_task(cfg: ExperimentConfig, workdir: str | Path) -> tuple[ExperimentConfig, Task]:
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
        from unclip_jax.core import augment

        example_fn = functools.partial(augment.colour_drop, p=cfg.data.colour_drop)

    def batches(start, mesh):
        return input_pipeline.make_batches(cfg.data, "train", batch_size=cfg.train.batch_size,
                                           tokenizer=tok, mesh=mesh, train=True, start=start,
                                           caption_fn=caption_fn, example_fn=example_fn)

    # train.evals: the evaluations asked for, logged as eval/<name>/<metric> by the loop; none: both
    # (zero-shot on captioned shapes), with the names the task always logged
    chosen = tuple(cfg.train.evals)
    shapes = cfg.data.name.startswith("captioned_shapes") and not cfg.data.shards
    if "zero_shot" in chosen and not shapes:
        raise ValueError(f"train.evals: zero_shot classifies captioned-shapes attributes, and "
                         f"the data is {cfg.data.name!r}; drop it from train.evals")

    def attributes(params) -> dict:
        # zero-shot through the text tower, and a linear probe fit on seen pairs' embeddings
        size = cfg.data.image_size
        return {**shapes_eval.zero_shot_accuracy(model, params, tokenize, image_size=size),
                **shapes_eval.linear_probe_accuracy(model, params, image_size=size)}

    def evaluate(state, step) -> dict:
        params = ema_or_raw(cfg, state)
        out = {}
        if chosen and "retrieval" not in chosen:
            return {f"zero_shot/{k}": v for k, v in attributes(params).items()}
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
        if chosen:
            out["retrieval/i2t_top1"] = hits / max(n, 1)
            if "zero_shot" in chosen:
                out.update({f"zero_shot/{k}": v for k, v in attributes(params).items()})
            return out
        out["val_i2t_top1"] = hits / max(n, 1)
        if shapes:
            out.update(attributes(params))
        return out

    task = Task(
        init=lambda rng, b: model.init(rng, b["image"], b["tokens"]),
        loss=lambda params, batch, rng: clip.loss_fn(model, params, batch, rng),
        batches=batches,
        example=clip.dummy_inputs(model_cfg, cfg.train.batch_size),
        evaluate=evaluate,
    )
    return cfg, task
