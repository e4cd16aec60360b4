"""Kill anywhere, lose nothing: SIGKILL a real ``unclip-jax train`` at random moments (seeded),
restart the same command until it finishes, and compare its final checkpoint bitwise with an
uninterrupted run of the same command.

Two models: the tiny CLIP of ``experiments/shapes/clip.py`` on a small 32 px captioned-shapes
build (the real input pipeline, tokenizer trained in the workdir), and the diffusion prior of
``experiments/shapes/prior.py`` on a synthetic embedding cache. Checkpoints are written every 2
steps, asynchronously, so kill moments drawn uniformly over a run often land in the middle of a
checkpoint write; after each kill the checkpoint folder is inspected (before anything else opens
it) for a half-written ``<step>.orbax-checkpoint-tmp`` folder, and such kills are counted.

Compared, to the bit: every leaf of the train state (step, params, optimizer state, EMA params,
rng, skip count), the data position and config stored with the last checkpoint, and the loss
curve in ``metrics.jsonl`` (all logged values except the timing).

Usage::

    python benchmarks/bench_kill_resume.py [--n 5] [--seed 0] [--models clip,prior]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
SIZES = dict(num_train=256, num_validation=32, num_test=32)
MAX_ATTEMPTS = 8
TMP_MARK = ".orbax-checkpoint-tmp"
STEP_RE = re.compile(rb"step (\d+): lr=")        # the loop's log line (tqdm may share the line)

COMMON = {"train.steps": STEPS, "train.log_every": 1, "train.ckpt_every": 2,
          "train.keep_checkpoints": 3, "train.eval_every": 0, "train.eval_at_end": "false",
          "train.async_checkpoint": "true", "train.ema_decay": 0.9, "optim.warmup_steps": 4,
          "mesh.data": 1}


# ----------------------------------------------------------------------------- set-up


def _synthetic_cache(path: Path, n: int = 256, e: int = 16, length: int = 8, w: int = 16) -> None:
    """An embedding cache in the layout of :mod:`unclip_jax.train.embeddings` (no CLIP needed)."""
    rng = np.random.default_rng(0)
    text = rng.normal(size=(n, e)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    img = text @ rng.normal(size=(e, e)).astype(np.float32)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    tokens = np.zeros((n, length), np.int32)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 2, rng.integers(4, 60, (n, 3)), 3
    arrays = {"text_emb": text, "image_emb": img, "text_tokens": tokens,
              "text_states": rng.normal(size=(n, length, w)).astype(np.float16),
              "index": np.arange(n, dtype=np.int64)}
    for split in ("train", "validation"):
        (path / split).mkdir(parents=True, exist_ok=True)
        np.savez(path / split / "shard_00000.npz", **arrays)
    (path / "meta.json").write_text(json.dumps({
        "clip_workdir": str(path / "no_clip"), "clip_step": 0, "embed_dim": e,
        "context_length": length, "text_width": w, "pad_id": 0, "shard_size": n,
        "splits": {s: {"count": n, "num_shards": 1} for s in ("train", "validation")}}))


def prepare(root: Path) -> dict[str, tuple[str, dict]]:
    """``{model: (config file, overrides)}`` with the data they need built under ``root``."""
    from unclip_jax.data.captioned_shapes import build_captioned_shapes, dataset_name

    data_dir = root / "data"
    build_captioned_shapes(data_dir, resolution=32, **SIZES)
    _synthetic_cache(root / "cache")
    clip = dict(COMMON, **{
        "data.data_dir": data_dir, "data.name": dataset_name(32, **SIZES),
        "data.vocab_size": 64, "train.batch_size": 16, "model.vision_layers": 1,
        "model.text_layers": 1, "model.vision_width": 32, "model.text_width": 32,
        "model.embed_dim": 16})
    prior = dict(COMMON, **{
        "model.embeddings_dir": root / "cache", "model.clip_workdir": "", "model.width": 32,
        "model.depth": 1, "model.num_heads": 2, "train.batch_size": 32})
    return {"clip": (str(ROOT / "experiments/shapes/clip.py"), clip),
            "prior": (str(ROOT / "experiments/shapes/prior.py"), prior)}


def command(config: str, workdir: Path, sets: dict) -> list[str]:
    exe = Path(sys.executable).with_name("unclip-jax")
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "unclip_jax.commands.cli"]
    out = head + ["train", config, "--workdir", str(workdir)]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)     # one CPU device, as the CLI runs by default
    return env


# ----------------------------------------------------------------------------- running


class Run:
    """A subprocess whose output goes to ``log``, with the highest logged step tracked live."""

    def __init__(self, cmd: list[str], log: Path):
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=_env(), cwd=ROOT)
        self.step, self.times = 0, {}
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(log,), daemon=True)
        self.reader.start()

    def _read(self, log: Path) -> None:
        with open(log, "ab") as f:
            for line in self.proc.stdout:
                f.write(line)
                for m in STEP_RE.finditer(line):
                    with self.cond:
                        self.step = max(self.step, int(m.group(1)))
                        self.times.setdefault(self.step, time.perf_counter() - self.t0)
                        self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for_step(self, k: int) -> bool:
        """Block until step ``k`` (or a later one) is logged; False when the run ended first."""
        with self.cond:
            self.cond.wait_for(lambda: self.step >= k or self.proc.poll() is not None)
            return self.step >= k

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def finish(self) -> tuple[int, float]:
        rc = self.proc.wait()
        self.reader.join()
        return rc, time.perf_counter() - self.t0


def inspect(workdir: Path) -> tuple[list[int], list[str]]:
    """Committed step folders and half-written (temporary) ones, by name only."""
    d = workdir / "checkpoints"
    names = sorted(os.listdir(d)) if d.is_dir() else []
    return (sorted(int(n) for n in names if n.isdigit()), [n for n in names if TMP_MARK in n])


def final_snapshot(workdir: Path) -> dict:
    """Everything compared between runs, as raw bytes per leaf."""
    import jax

    from unclip_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(workdir, async_save=False)
    step = ck.latest_step()
    snap = {"latest_step": step}
    for which in ("step", "params", "opt_state", "ema_params", "rng", "skipped"):
        leaves = jax.tree_util.tree_flatten_with_path(ck.restore_params(step, which))[0]
        snap[which] = {jax.tree_util.keystr(p): (np.asarray(x).dtype.str, np.asarray(x).shape,
                                                 np.asarray(x).tobytes()) for p, x in leaves}
    for item in ("data", "config"):
        snap[item] = json.loads((ck.directory / str(step) / item / "metadata").read_text())
    ck.close()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    snap["curve"] = [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]
    return snap


def differences(a: dict, b: dict) -> list[str]:
    out = []
    for key in a:
        if a[key] != b[key]:
            if isinstance(a[key], dict) and isinstance(b[key], dict):
                bad = sorted(k for k in set(a[key]) | set(b[key]) if a[key].get(k) != b[key].get(k))
                out.append(f"{key}: {len(bad)} differ (first {bad[0]})")
            else:
                out.append(f"{key} differs")
    return out


def reference(cmd: list[str], workdir: Path) -> tuple[dict, float, float, float]:
    """The uninterrupted run: its snapshot, wall time, when its first step was logged and the
    median time between logged steps (checkpoint writes included)."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    run = Run(cmd, workdir.parent / f"{workdir.name}.log")
    rc, wall = run.finish()
    if rc != 0:
        raise RuntimeError(f"reference run failed (exit {rc}); see {workdir}.log")
    t = [run.times[k] for k in sorted(run.times)]
    return final_snapshot(workdir), wall, t[0], float(np.median(np.diff(t)))


def trial(cmd: list[str], workdir: Path, ref: dict, first_step: float, interval: float,
          rng: random.Random) -> dict:
    """SIGKILL the run 1–2 times, then let it finish; compare with the reference.

    Each kill point is drawn against the run's progress, not the clock (CPU time here is
    shared): a step ``k`` uniform over [resume step, last step − 1] and a delay uniform over
    one step interval after step ``k`` is logged — with k = resume step meaning "during
    start-up" (imports, tokenizer, restore, compile), uniform over [0, first-step time].
    Checkpoints follow the log line of every even step, so many kills land mid-write.
    """
    log = workdir.parent / f"{workdir.name}.log"
    want = rng.randint(1, 2)
    out = {"kills": 0, "mid_write": 0, "starts": 0, "wall": 0.0, "after_kill": []}
    for _ in range(MAX_ATTEMPTS):
        steps, _ = inspect(workdir)
        resume = max(steps) if steps else 0
        run = Run(cmd, log)
        out["starts"] += 1
        killed = False
        if out["kills"] < want:
            k = rng.randint(resume, STEPS - 1)
            if k == resume:
                time.sleep(rng.uniform(0.0, first_step))
            else:
                run.wait_for_step(k)
                time.sleep(rng.uniform(0.0, interval))
            killed = run.proc.poll() is None
            if killed:
                run.kill()
        rc, wall = run.finish()
        out["wall"] += wall
        if killed:
            steps, tmps = inspect(workdir)
            out["kills"] += 1
            out["mid_write"] += bool(tmps)
            out["after_kill"].append((max(steps) if steps else None, tmps))
            continue
        if rc != 0:
            raise RuntimeError(f"a restart exited {rc}; see {log}")
        if out["kills"] >= want:
            break
        # Finished before the kill point: start over from scratch for the kill still owed.
        shutil.rmtree(workdir)
    else:
        raise RuntimeError(f"not finished after {MAX_ATTEMPTS} starts; see {log}")
    out["diffs"] = differences(ref, final_snapshot(workdir))
    return out


def bench(n: int = 5, seed: int = 0, models: tuple[str, ...] = ("clip", "prior"),
          root: Path | None = None, verbose: bool = True) -> dict:
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="kill_resume_")) if own else Path(root)
    try:
        setups = prepare(root)
        results = {}
        for name in models:
            config, sets = setups[name]
            t0 = time.perf_counter()
            ref, ref_wall, first, interval = reference(
                command(config, root / name / "ref", sets), root / name / "ref")
            rng = random.Random(f"{seed}-{name}")
            trials = []
            for i in range(n):
                w = root / name / f"trial{i}"
                r = trial(command(config, w, sets), w, ref, first, interval, rng)
                trials.append(r)
                if verbose:
                    print(f"{name} trial {i}: kills={r['kills']} (mid-write {r['mid_write']}) "
                          f"starts={r['starts']} after-kill={r['after_kill']} "
                          f"{'identical' if not r['diffs'] else r['diffs']}", flush=True)
            results[name] = {"trials": trials, "ref_wall": ref_wall,
                             "wall": time.perf_counter() - t0,
                             "identical": sum(not t["diffs"] for t in trials),
                             "final_step": ref["latest_step"]}
        return results
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def report(results: dict, n: int, seed: int) -> str:
    lines = [
        "## Kill anywhere, lose nothing (`bench_kill_resume.py`)", "",
        f"A real `unclip-jax train` run ({STEPS} steps, asynchronous checkpoints every 2 steps, "
        "keep 3, EMA on) is SIGKILLed 1–2 times per trial at points drawn uniformly (seed "
        f"{seed}) over its progress — after a random logged step plus a random fraction of a "
        "step interval, or during start-up (imports, tokenizer, restore, compile) — then "
        "restarted with the same command until it exits 0. Its final checkpoint (every state "
        "leaf: step, params, optimizer state, EMA, rng, skip count; data position; config) and "
        "its `metrics.jsonl` loss curve are compared to the bit with an uninterrupted run. "
        "*Mid-write* kills left a half-written `<step>.orbax-checkpoint-tmp` folder; the "
        "restart never picked one up.", "",
        "| model | identical | kills | mid-write kills | starts | uninterrupted run | wall |",
        "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r["trials"]
        lines.append(f"| {name} | **{r['identical']}/{n} identical** | "
                     f"{sum(x['kills'] for x in t)} | {sum(x['mid_write'] for x in t)} | "
                     f"{sum(x['starts'] for x in t)} | {r['ref_wall']:.0f} s | "
                     f"{r['wall']:.0f} s |")
    bad = [f"- {name} trial {i}: {', '.join(x['diffs'])}" for name, r in results.items()
           for i, x in enumerate(r["trials"]) if x["diffs"]]
    if bad:
        lines += ["", "Differences:", *bad]
    return "\n".join(lines) + "\n"


def run(n: int = 5, seed: int = 0) -> str:
    """The markdown section for ``benchmarks/run_all.py``."""
    return report(bench(n, seed, verbose=False), n, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5, help="kill-and-resume trials per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="clip,prior")
    p.add_argument("--keep", default=None, help="keep the runs in this folder")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = bench(args.n, args.seed, tuple(args.models.split(",")), root=args.keep)
    print(report(results, args.n, args.seed))
    for name, r in results.items():
        print(f"{name}: {r['identical']}/{args.n} identical")
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0 if all(r["identical"] == args.n for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
