"""Each model family's training task for the generic loop, ``(cfg, workdir) -> (cfg, Task)``.

A task resolves the config pieces that follow from the data and the frozen models it reads
(vocabulary from the tokenizer, embedding widths from the CLIP, grid size from the dVAE), so the
config saved with a checkpoint is the one the model was really built with, and supplies the
loss, the batches, an example batch and, where the family has them, the periodic evaluation and
sample grids. One module a family: ``clip``, ``prior`` (diffusion and AR), ``decoder`` (decoder
and upsampler), ``dalle`` (dVAE and DALL·E); shared pieces in ``common``. To add a model: write
its pure module, config and loss under ``unclip_jax/models/``, its task here, and register it
in ``TASKS``.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from unclip_jax.core.config import ExperimentConfig
from unclip_jax.train.loop import Task
from unclip_jax.train.tasks import evals
from unclip_jax.train.tasks.common import (TOKENIZER_CAPTIONS, ema_or_raw, ensure_dataset,
                                           ensure_tokenizer, image_grid, tokenizer_path)

# Task name -> "module:function" building it (imported on use, so a model's code loads only when
# that model is trained). Each function has the signature of ``clip.clip_task``.
TASKS = {
    "clip": "unclip_jax.train.tasks.clip:clip_task",
    "prior": "unclip_jax.train.tasks.prior:prior_task",
    "prior_ar": "unclip_jax.train.tasks.prior:prior_ar_task",
    "decoder": "unclip_jax.train.tasks.decoder:decoder_task",
    "upsampler": "unclip_jax.train.tasks.decoder:upsampler_task",
    "dvae": "unclip_jax.train.tasks.dalle:dvae_task",
    "dalle": "unclip_jax.train.tasks.dalle:dalle_task",
}

# Task name -> "module:function" building its sample grids, ``(cfg, workdir) -> samples`` (the
# Task's ``samples`` field), for the tasks that have them.
SAMPLE_GRIDS = {
    "decoder": "unclip_jax.train.tasks.decoder:decoder_sample_grid",
    "upsampler": "unclip_jax.train.tasks.decoder:upsampler_sample_grid",
    "prior": "unclip_jax.train.tasks.prior:prior_sample_grid",
    "prior_ar": "unclip_jax.train.tasks.prior:prior_sample_grid",
    "dalle": "unclip_jax.train.tasks.dalle:dalle_sample_grid",
}

# Task name -> "module:function" drawing samples for the evaluations of ``train.evals``,
# ``(cfg, workdir, n) -> generate(state) -> evals.Generated`` (the generators).
GENERATORS = {
    "decoder": "unclip_jax.train.tasks.decoder:decoder_generate",
    "upsampler": "unclip_jax.train.tasks.decoder:upsampler_generate",
    "prior": "unclip_jax.train.tasks.prior:prior_generate",
    "prior_ar": "unclip_jax.train.tasks.prior:prior_generate",
    "dalle": "unclip_jax.train.tasks.dalle:dalle_generate",
}


def _load(spec: str):
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def build_task(cfg: ExperimentConfig, workdir: str | Path) -> tuple[ExperimentConfig, Task]:
    """``(resolved cfg, Task)`` of ``cfg.task``, with its sample grids (``train.sample_every``)
    and the evaluations of ``train.evals`` in place of its own."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; accepted: {', '.join(sorted(TASKS))}")
    if cfg.train.sample_every and cfg.task not in SAMPLE_GRIDS:
        raise ValueError(f"train.sample_every: sample grids during training exist for "
                         f"{', '.join(sorted(SAMPLE_GRIDS))}, not {cfg.task!r}; set "
                         f"train.sample_every=0")
    if cfg.train.sample_every < 0 or cfg.train.sample_count < 1:
        raise ValueError(f"train.sample_every ≥ 0 and train.sample_count ≥ 1 are accepted, "
                         f"got {cfg.train.sample_every} and {cfg.train.sample_count}")
    if cfg.train.evals:
        if cfg.task == "clip":
            evals.check_evals(cfg.train.evals, evals.CLIP_EVALS, cfg.task)
        elif cfg.task in GENERATORS:
            evals.check_evals(cfg.train.evals, evals.GENERATOR_EVALS, cfg.task)
        else:
            raise ValueError(f"train.evals: the {cfg.task!r} task has only its own evaluation; "
                             f"configurable evaluations exist for clip and "
                             f"{', '.join(sorted(GENERATORS))}; set train.evals=")
        if cfg.train.eval_count < 1:
            raise ValueError(f"train.eval_count is a number of samples ≥ 1, got "
                             f"{cfg.train.eval_count}")
    cfg, task = _load(TASKS[cfg.task])(cfg, workdir)
    if cfg.train.sample_every and task.samples is None:
        task = dataclasses.replace(task, samples=_load(SAMPLE_GRIDS[cfg.task])(cfg, workdir))
    if cfg.train.evals and cfg.task in GENERATORS:
        generate = _load(GENERATORS[cfg.task])(cfg, workdir, cfg.train.eval_count)
        task = dataclasses.replace(task, evaluate=evals.generator_evaluate(
            cfg, generate, getattr(cfg.model, "clip_workdir", "")))
    return cfg, task


__all__ = ["GENERATORS", "SAMPLE_GRIDS", "TASKS", "TOKENIZER_CAPTIONS", "build_task", "ema_or_raw",
           "ensure_dataset", "ensure_tokenizer", "image_grid", "tokenizer_path"]
