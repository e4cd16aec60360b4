"""Evaluations during training chosen by config: ``train.evals`` names the evaluators a run
computes every ``train.eval_every`` steps (and at the end), big_vision's ``config.evals``
pattern. Empty: the task's own evaluation.

* CLIP: ``retrieval`` (image→text top-1 within validation batches), ``zero_shot`` (captioned
  shapes' colour / shape / size zero-shot accuracy).
* Generators (decoder, upsampler, the priors through ``train.sample_decoder``, DALL·E):
  ``clip_score`` (100·max(cos, 0) between the samples and their captions), ``fd_clip``
  (Fréchet distance of CLIP image features, samples against the real images of the same rows)
  and ``shapes_judge`` (the judge's fidelity, binding and relation; captioned shapes only).
  Each draws ``train.eval_count`` samples for the first validation rows, with a fixed seed and
  the model's own sampler settings (the task's generator, the one its sample grid shows); the
  CLIP is ``train.eval_clip`` or the model's ``clip_workdir``.

Every value goes to every writer as ``eval/<evaluator>`` or ``eval/<evaluator>/<metric>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from unclip_jax.train import runs
from unclip_jax.train.eval import metrics

CLIP_EVALS = ("retrieval", "zero_shot")
GENERATOR_EVALS = ("clip_score", "fd_clip", "shapes_judge")


@dataclasses.dataclass
class Generated:
    """What a generator drew for the evaluation rows: ``images`` ``[N, H, W, 3]`` in [-1, 1],
    one caption each, and the real side of FD_CLIP: the rows' real images (``real``) or, where
    there are none (the priors' embedding cache), their CLIP image features
    (``real_features``); the priors' ``real`` are the true embeddings' decoded images."""

    images: np.ndarray
    captions: list[str]
    real: np.ndarray | None = None
    real_features: np.ndarray | None = None
    inputs: np.ndarray | None = None     # an image input, where there is one (upsampler)


def check_evals(names: Sequence[str], accepted: Sequence[str], task: str) -> None:
    unknown = [n for n in names if n not in accepted]
    if unknown:
        raise ValueError(f"train.evals: {', '.join(map(repr, unknown))} is not an evaluation of "
                         f"the {task!r} task; accepted: {', '.join(accepted)}")


def generator_evaluate(cfg, generate: Callable, clip_workdir: str
                       ) -> Callable[[object, int], dict]:
    """``evaluate(state, step)`` computing ``cfg.train.evals`` (names of
    :data:`GENERATOR_EVALS`) on ``generate(state) -> Generated``."""
    names = tuple(cfg.train.evals)
    check_evals(names, GENERATOR_EVALS, cfg.task)
    if "shapes_judge" in names and not cfg.data.name.startswith("captioned_shapes"):
        raise ValueError(f"train.evals: shapes_judge reads captioned-shapes prompts, and the "
                         f"data is {cfg.data.name!r}; drop it from train.evals")
    clip = None
    if {"clip_score", "fd_clip"} & set(names):
        clip_workdir = cfg.train.eval_clip or clip_workdir
        if not clip_workdir:
            raise ValueError(f"train.evals: clip_score and fd_clip embed the samples with a "
                             f"CLIP, and the {cfg.task!r} model names none; set "
                             f"train.eval_clip to a trained CLIP run")
        frozen = runs.load_clip(clip_workdir)
        from unclip_jax.core.text import Tokenizer

        # host params: the evaluation runs inside the run's mesh, whatever device they are on
        clip = metrics.ClipFeatures(frozen.config, jax.device_get(frozen.params),
                                    Tokenizer.load(runs.tokenizer_path(clip_workdir)))

    def evaluate(state, step) -> dict:
        out = generate(state)
        pixels = np.clip(np.rint((out.images + 1) * 127.5), 0, 255).astype(np.uint8)
        result = {}
        feats = clip.images(out.images) if clip is not None else None
        if "clip_score" in names:
            scores = metrics.clip_scores(feats, clip.texts(out.captions))
            result["clip_score"] = float(np.mean(scores))
        if "fd_clip" in names:
            real = (out.real_features if out.real_features is not None
                    else clip.images(out.real))
            result["fd_clip"] = metrics.frechet_distance(
                metrics.FeatureStats.of(real), metrics.FeatureStats.of(feats))
        if "shapes_judge" in names:
            judged = metrics.judge_scores(pixels, out.captions)
            result.update({f"shapes_judge/{k}": float(v) for k, v in judged.items()
                           if k in ("single_colour_shape", "two_both_colour_shape",
                                    "relation", "exact") and v is not None})
        return result

    return evaluate
