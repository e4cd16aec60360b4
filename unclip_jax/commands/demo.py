"""The main job (`make demo`): every stage on the built-in captioned-shapes data, resumable.

Stages run in order and each is skipped when its output exists (re-running the demo after an
interruption picks up where it stopped; a half-trained model resumes from its checkpoint):

1. data       render captioned_shapes at the CLIP resolution (TFDS, ArrayRecord)
2. tokenizer  sentencepiece BPE on the training captions
3. clip       train the CLIP of ``<config_dir>/clip.py``
4. clip_eval  zero-shot colour / shape / size accuracy on held-out test renders
5. prior      the diffusion prior of ``<config_dir>/prior.py`` on the CLIP's embeddings
6. decoder    the unCLIP decoder of ``<config_dir>/decoder.py``, conditioned on the CLIP
7. upsampler  the 32 → 64 px upsampler of ``<config_dir>/upsampler.py`` (skipped when the
              decoder already draws at the upsampler's output size)
8. samples    text → image on held-out (test-split) prompts through the whole chain, judged by
              the shapes judge; ``samples.png`` (prompts in ``samples.txt``), a variations grid,
              and the prompt-fidelity / binding / variation-consistency figures in the report

``stages`` picks a prefix of them. ``--set`` overrides name their model: ``decoder:train.steps=
2000`` changes the decoder's config (``clip:``, ``prior:``, ``decoder:``, ``upsampler:``); an
override without a prefix applies to the CLIP, as before.

Outputs land in ``<workdir>``: one sub-folder per model, ``report.md`` and ``report.json``.

Wall times: a stage's time is stored in ``<workdir>/stage_times.json`` by the run that did its
work (training, building, sampling), and a later run that only finds the stage finished
records its (skip) time separately, so the report's table keeps the real cost of each stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from unclip_jax.core import config as config_lib


TIMES_FILE = "stage_times.json"


def read_times(workdir: Path) -> dict:
    """``{stage: seconds}`` of the runs that did each stage's work (empty when none yet)."""
    path = Path(workdir) / TIMES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _writer() -> bool:
    """Whether this process writes the demo's files (several processes: process 0 only)."""
    import jax

    return jax.process_index() == 0


def _write_times(workdir: Path, times: dict) -> None:
    if not _writer():
        return
    path = Path(workdir) / TIMES_FILE
    tmp = path.with_name(f".{TIMES_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(times, indent=2) + "\n")
    os.replace(tmp, path)


def run_stage(report: dict, workdir: Path, name: str, fn, done: Callable[[], bool]) -> None:
    """Run stage ``name``; ``done()`` (asked before) says whether it was already finished.

    A stage that does work stores its wall time in ``stage_times.json``; a finished one only
    reports how long the check took (``report["skip_s"]``). ``report["wall_s"]`` holds the
    stored time of the run that did the work (None when that run predates the times file)."""
    was_done = done()
    t0 = time.perf_counter()
    print(f"\n=== demo stage: {name}" + (" (finished before: checking)" if was_done else ""),
          flush=True)
    result = fn()
    seconds = round(time.perf_counter() - t0, 1)
    times = read_times(workdir)
    if was_done:
        report.setdefault("skip_s", {})[name] = seconds
    else:
        times[name] = seconds
        _write_times(workdir, times)
    report.setdefault("wall_s", {})[name] = times.get(name)
    if result is not None:
        report[name] = result


def is_trained(workdir: Path, steps: int) -> bool:
    """Whether ``workdir`` holds a complete checkpoint at step ≥ ``steps`` (the training loop
    then only restores and returns)."""
    ckpts = Path(workdir) / "checkpoints"
    if not ckpts.is_dir():
        return False
    done = [int(d.name) for d in ckpts.iterdir() if d.name.isdigit()
            and all((d / item / "metadata").is_file() for item in ("data", "config"))]
    return bool(done) and max(done) >= steps


STAGES = ("data", "tokenizer", "clip", "clip_eval", "prior", "decoder", "upsampler", "samples")
TRAINED = ("clip", "prior", "decoder", "upsampler")     # the stages that train a model


def split_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """``["decoder:train.steps=2000", "train.steps=500"]`` → ``{"decoder": [...], "clip":
    [...], ...}`` (one list per trained stage; no prefix means the CLIP)."""
    out: dict[str, list[str]] = {name: [] for name in TRAINED}
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in out:
                raise ValueError(f"override {item!r} names stage {head!r}; the demo's trained "
                                 f"stages are {', '.join(TRAINED)} (no prefix = clip)")
            out[head].append(rest)
        else:
            out["clip"].append(item)
    return out
NUM_JUDGED = 64          # held-out prompts per kind (single-object, two-object) in the report
NUM_VARIED = 32          # held-out single-object renders whose 4 variations are judged; the
                         # 4 of one render agree with each other, so at 8 renders the figure
                         # moved ±0.15 between runs of the same recipe (s.e. ≈ 0.06 at 32)


def _train_stage(config: Path, workdir: Path, overrides: list[str]) -> None:
    """Train (or resume, or skip when finished) the model of ``config`` in ``workdir``."""
    from unclip_jax.train import loop, tasks

    cfg = config_lib.load_config(config, overrides)
    cfg, task = tasks.build_task(cfg, workdir)
    loop.train(cfg, task, workdir)


def run(workdir: str | Path = "runs/demo", config_dir: str | Path = "experiments/shapes",
        overrides: list[str] | tuple[str, ...] = (), stages: tuple[str, ...] = STAGES) -> dict:
    from unclip_jax.train import loop, tasks

    workdir, config_dir = Path(workdir), Path(config_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict = {}

    per_stage = split_overrides(overrides)
    clip_cfg = config_lib.load_config(config_dir / "clip.py", per_stage["clip"])
    clip_cfg = dataclasses.replace(clip_cfg, data=dataclasses.replace(
        clip_cfg.data, tokenizer=str(workdir / "tokenizer.model")))
    clip_dir = workdir / "clip"

    w = workdir.absolute()
    chain = {
        "prior": ("prior.py", [f"model.clip_workdir={w}/clip",
                               f"model.embeddings_dir={w}/embeddings"]),
        "decoder": ("decoder.py", [f"model.clip_workdir={w}/clip",
                                   f"data.tokenizer={w}/tokenizer.model"]),
        "upsampler": ("upsampler.py", []),
    }
    # every config is loaded (and its overrides checked) before the first stage trains
    configs = {name: config_lib.load_config(config_dir / config, sets + per_stage[name])
               for name, (config, sets) in chain.items()}
    # the decoder reads CLIP image embeddings from a cache instead of running the frozen image
    # tower in every step (the same embeddings: tests/test_embeddings.py): the prior stage's
    # when both train on the same images, else a cache of the decoder's own dataset
    chain["decoder"][1].append(f"model.embeddings_dir={w}/" + embeddings_dir_name(
        configs["decoder"].data.name, configs["prior"].data.name))
    if not needs_upsampler(configs["decoder"].data.image_size,
                           configs["upsampler"].data.image_size):
        del chain["upsampler"]          # the decoder already draws at the output size
    steps = {name: configs[name].train.steps for name in chain}

    def have_data() -> bool:
        from unclip_jax.data import input_pipeline
        try:
            input_pipeline.dataset_dir(clip_cfg.data.name, clip_cfg.data.data_dir)
            return True
        except FileNotFoundError:
            return False

    run_stage(report, workdir, "data", lambda: tasks.ensure_dataset(clip_cfg.data), have_data)
    run_stage(report, workdir, "tokenizer", lambda: tasks.ensure_tokenizer(
        dataclasses.replace(clip_cfg.data, tokenizer=""), workdir) and None,
        lambda: (workdir / "tokenizer.model").is_file())

    def train_clip():
        cfg, task = tasks.build_task(clip_cfg, clip_dir)
        loop.train(cfg, task, clip_dir)
        return None

    run_stage(report, workdir, "clip", train_clip,
              lambda: is_trained(clip_dir, clip_cfg.train.steps))

    def eval_clip():
        out = clip_dir / "eval.json"
        if out.is_file():
            return json.loads(out.read_text())
        cfg, task = tasks.build_task(clip_cfg, clip_dir)
        metrics = loop.evaluate_checkpoint(cfg, task, clip_dir)
        if _writer():
            out.write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics

    run_stage(report, workdir, "clip_eval", eval_clip, lambda: (clip_dir / "eval.json").is_file())

    for name, (config, sets) in chain.items():
        if name in stages:
            run_stage(report, workdir, name, lambda c=config, n=name, o=sets + per_stage[name]:
                      _train_stage(config_dir / c, workdir / n, o),
                      lambda n=name: is_trained(workdir / n, steps[n]))
    if "samples" in stages:
        run_stage(report, workdir, "samples",
                  lambda: _samples(workdir, upsampler="upsampler" in chain),
                  lambda: _samples_done(workdir))
    known = [v for v in report["wall_s"].values() if v is not None]
    report["wall_s"]["total"] = round(sum(known), 1)
    report["total_is_partial"] = len(known) < len(report["wall_s"]) - 1   # some stage unknown
    report["this_run_s"] = round(time.perf_counter() - t_start, 1)
    report["stage_times_note"] = read_times(workdir).get("_note")
    report["recipe"] = recipe(workdir)
    from unclip_jax.core import sharding

    report["backend"] = sharding.describe_backend()
    markdown = report_markdown(report, clip_cfg)
    if _writer():
        (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (workdir / "report.md").write_text(markdown)
    print(markdown, flush=True)
    return report


SAMPLE_METRICS = ("clip_score", "fd_clip", "diversity")   # samples.json without them is redone
GEN_BATCH = 16


def _samples_done(workdir: Path) -> bool:
    out = workdir / "samples.json"
    return out.is_file() and all(k in json.loads(out.read_text()) for k in SAMPLE_METRICS)


def held_out_scenes(seed: int = 7, num: int = NUM_JUDGED) -> list:
    """``num`` single-object then ``num`` two-object scenes of the test split (colour–shape
    pairs never seen in training); a larger ``num`` extends the same list of each kind."""
    from unclip_jax.core import shapes

    return [shapes.sample_scene(seed, i, "test", num_objects=k)
            for k in (1, 2) for i in range(num)]


def judge_chain(model, num: int = NUM_JUDGED, num_variations: int = NUM_VARIED,
                **settings) -> tuple[dict, tuple]:
    """The demo's judge procedure on an :class:`~unclip_jax.pipelines.unclip.UnCLIP` chain:
    one image per held-out prompt (``num`` of each kind, batches of ``GEN_BATCH`` with seed =
    the batch's first index; ``settings``: :func:`~unclip_jax.pipelines.unclip.generate`'s)
    read back by the shapes judge at the output resolution, and the variation consistency of
    ``num_variations`` held-out single-object renders (4 variations each). Returns ``(scores,
    (prompts, uint8 images))``."""
    import numpy as np

    from unclip_jax.core import shapes
    from unclip_jax.train.eval import metrics
    from unclip_jax.pipelines import manipulate, unclip

    scenes = held_out_scenes(num=num)
    prompts = [shapes.caption(s) for s in scenes]
    t0 = time.perf_counter()
    generated = np.concatenate([unclip.generate(model, prompts[i:i + GEN_BATCH], seed=i,
                                                **settings)
                                for i in range(0, len(prompts), GEN_BATCH)])
    scores = metrics.judge_scores(generated, prompts)
    scores["judged_wall_s"] = round(time.perf_counter() - t0, 1)
    singles = [shapes.sample_scene(7, i, "test", num_objects=1) for i in range(num_variations)]
    renders = [shapes.render(s, model.decoder.image_size) for s in singles]
    scores["variation_consistency"] = manipulate.variation_consistency(model, renders, n=4)
    scores["num_varied"] = len(renders)
    return scores, (prompts, generated)


def sample_metrics(clip, images, prompts, real_images, reference_images) -> dict:
    """CLIP score, Fréchet distance (CLIP image features) and diversity of generated images.

    ``real_images``: renders of the prompts' own scenes (the CLIP score ceiling and the FD
    target); ``reference_images``: renders of other held-out scenes, whose FD to
    ``real_images`` is the floor a perfect generator would reach at this sample count."""
    from unclip_jax.train.eval import metrics

    feats = {k: clip.images(v) for k, v in (("fake", images), ("real", real_images),
                                            ("ref", reference_images))}
    text = clip.texts(prompts)
    stats = {k: metrics.FeatureStats.of(v) for k, v in feats.items()}
    return {
        "clip_score": float(metrics.clip_scores(feats["fake"], text).mean()),
        "clip_score_real": float(metrics.clip_scores(feats["real"], text).mean()),
        "fd_clip": metrics.frechet_distance(stats["real"], stats["fake"]),
        "fd_clip_real_vs_real": metrics.frechet_distance(stats["real"], stats["ref"]),
        "diversity": metrics.mean_pairwise_distance(feats["fake"]),
        "diversity_real": metrics.mean_pairwise_distance(feats["real"]),
        "num_samples": int(len(images)), "feature_dim": int(feats["fake"].shape[1]),
    }


def embeddings_dir_name(decoder_data: str, prior_data: str) -> str:
    """The demo workdir's sub-folder holding the decoder's cached CLIP image embeddings: the
    prior's ``embeddings`` when both read the same dataset, else ``embeddings_<config>``."""
    if decoder_data == prior_data:
        return "embeddings"
    return "embeddings_" + decoder_data.rstrip("/").rsplit("/", 1)[-1]


def needs_upsampler(decoder_size: int, upsampler_size: int) -> bool:
    """Whether the chain runs the upsampler stage: not when the decoder (whose image side is its
    data's) already draws at or above the upsampler's output side."""
    return decoder_size < upsampler_size


def _samples(workdir: Path, upsampler: bool = True) -> dict:
    """Generate held-out prompts through the whole chain (``upsampler``: with the demo's
    upsampler), judge them and measure CLIP score, Fréchet distance and diversity (cached in
    samples.json)."""
    import numpy as np

    from unclip_jax.core import shapes
    from unclip_jax.train.eval import metrics
    from unclip_jax.core.images import save_grid
    from unclip_jax.pipelines import manipulate, unclip

    out = workdir / "samples.json"
    if _samples_done(workdir):
        return json.loads(out.read_text())
    model = unclip.load_unclip(workdir / "clip", workdir / "tokenizer.model", workdir / "prior",
                               workdir / "decoder",
                               [workdir / "upsampler"] if upsampler else [])
    scores, (prompts, generated) = judge_chain(model)
    scenes = held_out_scenes()
    size = model.resolution
    t0 = time.perf_counter()
    scores.update(sample_metrics(
        metrics.ClipFeatures.from_unclip(model), generated, prompts,
        np.stack([shapes.render(s, size) for s in scenes]),
        np.stack([shapes.render(s, size) for s in held_out_scenes(seed=8)])))
    scores["metrics_wall_s"] = round(time.perf_counter() - t0, 1)
    scores["load_average_1min"] = round(os.getloadavg()[0], 1)    # other jobs on the machine
    shown = prompts[:8] + prompts[NUM_JUDGED:NUM_JUDGED + 8]
    unclip.generate(model, shown[:8], seed=1)                  # compiles for a batch of 8
    t0 = time.perf_counter()
    images = unclip.generate(model, shown[:8], seed=1)
    scores["generate_8_after_compile_s"] = round(time.perf_counter() - t0, 2)
    images = np.concatenate([images, unclip.generate(model, shown[8:], seed=2)])
    save_grid(images, workdir / "samples.png", columns=8)
    if _writer():
        (workdir / "samples.txt").write_text("\n".join(shown) + "\n")
    scenes = [shapes.sample_scene(7, i, "test", num_objects=1) for i in range(4)]
    renders = [shapes.render(s, model.decoder.image_size) for s in scenes]
    rows = [np.concatenate([shapes.render(s, model.resolution)[None],
                            manipulate.variations(model, r, n=4, seed=i)])
            for i, (s, r) in enumerate(zip(scenes, renders))]
    save_grid([np.asarray(r, np.uint8) for r in rows], workdir / "variations.png")
    if _writer():
        out.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


RECIPE_KEYS = {
    "clip": ("train.steps", "train.batch_size"),
    "prior": ("train.steps", "train.batch_size"),
    "decoder": ("train.steps", "train.batch_size", "model.patch_size", "model.base_channels",
                "model.channel_mult", "model.num_res_blocks", "model.attention_resolutions",
                "model.timestep_sampling", "model.timestep_loc", "model.timestep_scale",
                "model.text_class_emb",
                "model.embeddings_dir", "model.min_snr_gamma",
                "model.clip_drop_prob", "model.text_drop_prob", "optim.optimizer",
                "optim.learning_rate",
                "train.ema_decay", "model.sample_method", "model.sample_spacing",
                "model.sample_steps", "model.guidance_scale"),
    "upsampler": ("train.steps", "train.batch_size", "model.patch_size",
                  "model.base_channels", "model.sample_method", "model.sample_spacing",
                  "model.sample_steps"),
}


def recipe(workdir: Path) -> dict:
    """``{stage: {setting: value}}``: the recipe each trained stage ran with (its saved
    config), for the report."""
    out = {}
    for stage, keys in RECIPE_KEYS.items():
        path = Path(workdir) / stage / "config.json"
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text())
        picked = {}
        for key in keys:
            node = cfg
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                picked[key] = node
        out[stage] = picked
    return out


def report_markdown(report: dict, clip_cfg) -> str:
    """``report.md``: the CLIP's zero-shot table, the stage wall times and the sample scores of
    a demo ``report`` (``clip_cfg``: the CLIP run's config, for its data and budget)."""
    ev = report.get("clip_eval", {})
    lines = [
        "# unclip_jax demo report", "",
        f"Data: `{clip_cfg.data.name}`; CLIP trained {clip_cfg.train.steps} steps at batch "
        f"{clip_cfg.train.batch_size}.", "",
        "## CLIP zero-shot on held-out test renders (single objects, unseen colour–shape pairs)",
        "", "(`probe_*`: a linear classifier fit on seen pairs' image embeddings, scored on the "
        "held-out pairs: how much of a held-out pair lies along the seen pairs' directions; "
        "`probe_shape_per_size`: one shape classifier per object size.)", "",
        "| attribute | accuracy |", "|---|---|",
    ]
    for key in ("zs_colour", "zs_shape", "zs_size", "probe_colour", "probe_shape",
                "probe_colour_shape", "probe_shape_per_size", "val_i2t_top1"):
        if key in ev:
            lines.append(f"| {key} | {ev[key]:.3f} |")
    if "prior" in report.get("wall_s", {}):
        lines += ["", "Diffusion prior: see `prior/metrics.jsonl` (`val_cos` against the text "
                  "baseline)."]
    sm = report.get("samples")
    if sm:
        lines += ["", f"## Text → image on held-out prompts ({sm['num_single']} single-object, "
                  f"{sm['num_two']} two-object; judged at {sm['resolution']} px)", "",
                  "Shapes judge (fractions of prompts read back correctly):", "",
                  "| measure | fraction |", "|---|---|"]
        for key, what in (("single_colour_shape", "prompt fidelity: one object, colour+shape"),
                          ("two_both_colour_shape", "binding: two objects, both colour+shape"),
                          ("relation", "binding: two objects, relation"),
                          ("exact", "everything incl. sizes and count"),
                          ("variation_consistency", "variations keep the judged objects, "
                           f"{sm.get('num_varied', 8)} renders × 4")):
            if sm.get(key) is not None:
                lines.append(f"| {key} ({what}) | {sm[key]:.3f} |")
        if "clip_score" in sm:
            lines += ["", f"Sample metrics on CLIP image features ({sm['feature_dim']}-d, the "
                      f"chain's own CLIP, so CLIP score favours the chain; "
                      f"{sm['num_samples']} samples, one per prompt):", "",
                      "| measure | generated | real renders |", "|---|---|---|",
                      f"| CLIP score (100·max(cos, 0), mean) | {sm['clip_score']:.2f} | "
                      f"{sm['clip_score_real']:.2f} |",
                      f"| Fréchet distance to the prompts' renders (FD_CLIP) | "
                      f"{sm['fd_clip']:.4f} | {sm['fd_clip_real_vs_real']:.4f} (other "
                      f"held-out renders: the floor at this n) |",
                      f"| diversity (mean pairwise feature distance) | {sm['diversity']:.4f} | "
                      f"{sm['diversity_real']:.4f} |"]
        load = (f" (1-min load average {sm['load_average_1min']} on this machine)"
                if "load_average_1min" in sm else "")
        lines += ["", f"One 8-image guided generation after compile: "
                  f"{sm['generate_8_after_compile_s']} s{load}. Grid: `samples.png` (prompts in "
                  "`samples.txt`), variations: `variations.png`."]
    if report.get("recipe"):
        lines += ["", "## Recipe", "", f"Ran on {report.get('backend', '?')}.", "",
                  "| stage | settings |", "|---|---|"]
        for stage, picked in report["recipe"].items():
            cells = ", ".join(f"`{k}={v!r}`" for k, v in picked.items())
            lines.append(f"| {stage} | {cells} |")
    lines += ["", "## Wall time (s)", "",
              "Each stage's time is that of the run that did its work (stored in "
              f"`{TIMES_FILE}`); a run that found the stage finished only checked it "
              "(last column, this run).", ""]
    if report.get("stage_times_note"):
        lines += [f"Note: {report['stage_times_note']}", ""]
    lines += ["| stage | seconds (doing the work) | seconds (this run, skipping) |",
              "|---|---|---|"]
    skip = report.get("skip_s", {})
    for k, v in report["wall_s"].items():
        shown = "—" if v is None else v
        if k == "total" and report.get("total_is_partial"):
            shown = f"≥ {v} (stages marked — unknown)"
        lines.append(f"| {k} | {shown} | {skip.get(k, '')} |")
    lines.append(f"| this run | | {report.get('this_run_s', '')} |")
    return "\n".join(lines) + "\n"
