"""Seconds per training step of decoder recipes: the x-axis of the quality-vs-compute curve.

Each recipe is `experiments/shapes/decoder.py` with ``--set`` overrides, built through the real
training task (``tasks.build_task``: the frozen CLIP of ``--clip``, the tokenizer, the cached
embeddings where the recipe reads them) and stepped the way ``unclip-jax demo`` trains on this
CPU: the batch split over one XLA device per core (``sharding.split_cpu_cores``), params
replicated, the loop's own ``train_step`` (AdamW, EMA). A synthetic batch (random images and
tokens; cached embeddings fed as the data pipeline would) is stepped ``STEPS`` times after
``WARMUP`` calls; the median is reported. Each recipe runs in its own interpreter. A
self-conditioned recipe (``model.self_condition`` = p) times its two steps apart (with the
first forward pass, and without) and reports p · the first + (1 − p) · the second.

The curve's cost axis is ``steps × this median`` (measured on a quiet machine), so training
runs made while other jobs shared the cores still land at the right x.

Usage: ``python benchmarks/bench_decoder_recipes.py [--clip runs/demo/clip] [--out F.json]
[--profile] [NAME ...]`` (or ``run_all.py decoder_recipes``); names pick recipes from
``RECIPES``. ``--profile`` adds where the step's time goes: ``PROFILED`` steps traced with
``jax.profiler``, each XLA thunk's self time on the CPU client's worker threads summed by kind
(convolution forward / input gradient / kernel gradient, matmuls, layout copies, the
gradient all-reduce and its waits, normalisation layers, the update outside forward and
backward, the rest: read from each fusion's HLO and its ops' ``op_name``), in ms per step
per worker thread and as shares.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
BACKEND = "cpu"
STEPS, WARMUP = 12, 3
PROFILED = 3



def _curve():
    """``experiments/shapes/decoder_curve.py`` (its recipes and their common base: one list for
    both scripts)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "decoder_curve", ROOT / "experiments/shapes/decoder_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CURVE = _curve()
RECIPES = CURVE.RECIPES


def _thunk_kind(name: str, fused: dict[str, str]) -> str:
    """The kind of one XLA:CPU thunk of the step (``fused``: fusion name -> its computation's
    HLO text). A kernel gradient is the convolution whose window spans the activations (every
    kernel here is 3×3 or 1×1, the latter run as matmuls); an input gradient carries the
    ``transpose(`` of autodiff in its op name."""
    import re

    base = re.sub(r"\.\d+$", "", name)
    if base in ("all-reduce", "Rendezvous") or base.startswith("Wait"):
        return "all-reduce and waits"
    if base.startswith(("transpose", "copy")) or base == "concatenate":
        return "layout copies"
    body = fused.get(name, "")
    conv = re.search(r"convolution\(.*?window=\{size=(\d+)x(\d+)", body)
    if conv:
        if int(conv.group(1)) * int(conv.group(2)) > 9:
            return "conv kernel gradient"
        return "conv input gradient" if "transpose(" in body else "conv forward"
    if base == "dot" or " dot(" in body:
        return "matmul"
    ops = re.findall(r'op_name="([^"]+)"', body)
    if any(re.search(r"/(\w*norm\w*|ln_\w+|\w*_ln)/", o) for o in ops):
        return "normalisation"         # GroupNorm / LayerNorm, forward or backward, and the
                                       # elementwise work XLA fused into them
    if ops and not any("jvp(" in o for o in ops):
        return "update"                # outside forward and backward: AdamW, EMA, the finite
                                       # checks, the learning-rate schedule
    return "other"


def profile_step(step, state, batch, hlo: str) -> dict:
    """Where ``PROFILED`` calls of the compiled ``step`` spend the CPU workers' time (see the
    module docstring); ``hlo``: the compiled step's text, to read what each fusion computes."""
    import gzip
    import re

    import jax

    fused = {}
    for m in re.finditer(r"\n  %(\S+) = [^\n]*calls=%(\S+?)[,\s]", hlo):
        body = re.search(r"\n%" + re.escape(m.group(2)) + r" \(.*?\n\}\n", hlo, re.S)
        fused[m.group(1)] = body.group(0) if body else ""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(PROFILED):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        trace = next(Path(tmp).rglob("perfetto_trace.json.gz"))
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return where_the_time_goes(events, fused)


def where_the_time_goes(events: list[dict], fused: dict[str, str],
                        steps: int = PROFILED) -> dict:
    """Self time (a thunk's time less the thunks nested in it: an all-reduce holds its
    rendezvous, which holds its wait) of the trace ``events`` on the CPU client's worker
    threads, summed by ``_thunk_kind``: ms per step (of ``steps``) per worker, and shares."""
    import collections

    workers = {e["tid"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"
               and "XLAEigen" in e["args"]["name"]}
    ms = collections.Counter()
    spans = sorted((e for e in events if e.get("ph") == "X" and e.get("tid") in workers
                    and not e["name"].startswith("ThunkExecutor")),
                   key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    open_spans = []
    for e in spans:
        while open_spans and (open_spans[-1]["tid"] != e["tid"] or
                              open_spans[-1]["ts"] + open_spans[-1]["dur"] <= e["ts"]):
            open_spans.pop()
        if open_spans:
            ms[_thunk_kind(open_spans[-1]["name"], fused)] -= e["dur"]
        ms[_thunk_kind(e["name"], fused)] += e["dur"]
        open_spans.append(e)
    ms = collections.Counter({k: v / 1e3 / steps / len(workers) for k, v in ms.items()})
    total = sum(ms.values())
    return {k: {"ms": round(v, 1), "share": round(v / total, 3)} for k, v in ms.most_common()}


# a self-conditioned recipe's step takes one of two branches (a batch-level coin: with or
# without the first forward pass), so a median over steps would time one of them: each branch
# is timed alone, the coin forced by these probabilities, and weighted by the recipe's own
ALWAYS, NEVER = 1 - 1e-9, 1e-9


def child(name: str, clip: str, emb: str, profile: bool = False) -> dict:
    from unclip_jax.core import config as config_lib

    cfg = config_lib.load_config(ROOT / "experiments/shapes/decoder.py",
                                 recipe_overrides(name, clip, emb))
    p = cfg.model.self_condition
    if p == 0:
        return child_step(name, clip, emb, profile)
    both = {k: child_step(name, clip, emb, profile, [f"model.self_condition={q}"])
            for k, q in (("with_estimate", ALWAYS), ("without", NEVER))}
    row = both["with_estimate"]
    seconds = p * row["s_per_step"] + (1 - p) * both["without"]["s_per_step"]
    return {**row, "s_per_step": round(seconds, 4),
            "s_per_step_by_branch": {k: r["s_per_step"] for k, r in both.items()}}


def recipe_overrides(name: str, clip: str, emb: str) -> list[str]:
    return CURVE.BASE + [o.format(emb=emb) for o in RECIPES[name]] + [
        f"model.clip_workdir={clip}", f"data.tokenizer={Path(clip).parent}/tokenizer.model"]


def child_step(name: str, clip: str, emb: str, profile: bool = False,
               extra: list[str] = ()) -> dict:
    import functools

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_mfu import time_step
    from unclip_jax.core import config as config_lib
    from unclip_jax.core import sharding
    from unclip_jax.train import loop, tasks
    from unclip_jax.train.optim import make_optimizer
    from unclip_jax.train.state import TrainState

    cfg = config_lib.load_config(ROOT / "experiments/shapes/decoder.py",
                                 recipe_overrides(name, clip, emb) + list(extra))
    with tempfile.TemporaryDirectory() as tmp:
        cfg, task = tasks.build_task(cfg, tmp)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, model=1))
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    params = nn.meta.unbox(task.init(jax.random.key(0), task.example))["params"]

    def new_state():          # a fresh copy each time: the jitted step donates its state
        state = TrainState.create(jax.tree.map(jnp.copy, params), tx, jax.random.key(1),
                                  ema=cfg.train.ema_decay > 0)
        return jax.device_put(state, sharding.replicated(mesh))

    r = np.random.default_rng(0)
    batch = {}
    for k, v in task.example.items():
        if k == "tokens":
            batch[k] = r.integers(3, cfg.model.vocab_size, v.shape).astype(np.int32)
        elif k == "image_emb":
            e = r.normal(size=v.shape)
            batch[k] = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
        else:
            batch[k] = r.uniform(-1, 1, v.shape).astype(np.float32)
    batch = sharding.shard_batch(batch, mesh)
    step = jax.jit(functools.partial(loop.train_step, loss_fn=task.loss, tx=tx,
                                     ema_decay=cfg.train.ema_decay),
                   donate_argnums=0).lower(new_state(), batch).compile()
    where = {}
    if profile:
        state, _ = step(new_state(), batch)
        where = {"where": profile_step(step, state, batch, step.as_text())}
    seconds = time_step(step, new_state(), batch)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {"recipe": name, "overrides": RECIPES[name], "devices": len(jax.devices()),
            "batch": cfg.train.batch_size, "s_per_step": round(seconds, 4),
            "params": int(n_params), **where}


def measure(name: str, clip: str, emb: str, devices: int | None = None,
            xla_flags: str = "", profile: bool = False) -> dict:
    """One recipe's row, stepped in a fresh interpreter; ``xla_flags`` (e.g.
    ``--xla_cpu_use_onednn=true``) are passed to XLA after the device count."""
    cores = os.cpu_count() or 1
    n = devices or min(8, 1 << (cores.bit_length() - 1))     # one device per core, as the demo
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n} {xla_flags}".strip(),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--child", name, "--clip", clip,
                          "--emb", emb] + ["--profile"] * profile, env=env, check=True,
                         capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "xla_flags": xla_flags} if xla_flags else row


# the recipes whose training step differs (the others change only what is sampled or weighted)
DISTINCT = [n for n in RECIPES if n not in CURVE.SAME_COST]
# the rows of the last run, read by decoder_curve.py's report as the curve's costs
ROWS_JSON = ROOT / "benchmarks/results/bench_decoder_recipes.json"


def run(names=None, clip: str = "runs/demo/clip", emb: str = "runs/demo/embeddings") -> str:
    load = os.getloadavg()[0]
    rows = [measure(n, clip, emb) for n in (names or DISTINCT)]
    ROWS_JSON.parent.mkdir(exist_ok=True)
    ROWS_JSON.write_text(json.dumps(rows, indent=1) + "\n")
    base = rows[0]["s_per_step"]
    lines = [
        "## Decoder recipes: seconds per training step (`bench_decoder_recipes.py`)", "",
        "`experiments/shapes/decoder.py` set back to the recipe before the study "
        "(`decoder_curve.BASE`) with each recipe's overrides, built by the real "
        "training task, stepped as `make demo` trains on this CPU (one XLA device per core, "
        f"data-parallel); median of {STEPS} steps after {WARMUP} warm-up calls; 1-minute load "
        f"average {load:.1f} before the runs.", "",
        "| recipe | overrides | params | s/step | vs first row |", "|---|---|---:|---:|---:|"]
    for r in rows:
        sets = " ".join(f"`{o}`" for o in r["overrides"]) or "—"
        lines.append(f"| {r['recipe']} | {sets} | {r['params'] / 1e6:.2f} M | "
                     f"{r['s_per_step']:.3f} | {r['s_per_step'] / base:.2f}× |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--child", default=None)
    ap.add_argument("--clip", default="runs/demo/clip")
    ap.add_argument("--emb", default="runs/demo/embeddings")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    ap.add_argument("--xla-flags", default="",
                    help="XLA flags for every recipe's interpreter (CPU codegen options)")
    ap.add_argument("--profile", action="store_true",
                    help="also trace the step and say where its time goes")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.clip, args.emb, args.profile)))
        return
    names = args.names or DISTINCT
    rows = []
    for n in names:
        rows.append(measure(n, args.clip, args.emb, xla_flags=args.xla_flags,
                            profile=args.profile))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
