"""The one generic training loop. Each model supplies a :class:`Task` (init, loss, data, eval).

Sections, in order: mesh → input → ``jax.eval_shape(init)`` → shardings → ``jit(init,
out_shardings)`` or restore → update step (``jit`` with in/out shardings and donation) → loop
(progress bar, metric writers — JSONL, TensorBoard, W&B —, periodic eval, checkpoints,
non-finite guard).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from unclip_jax.core import config as config_lib
from unclip_jax.core import sharding
from unclip_jax.train.checkpoint import Checkpointer
from unclip_jax.train.optim import learning_rate_schedule, make_optimizer
from unclip_jax.train.state import TrainState, ema_update
from unclip_jax.train.writers import MetricWriters, check_writers

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteError(FloatingPointError):
    """A loss or gradient went NaN/Inf and the config says to stop."""


@dataclasses.dataclass
class Task:
    """What a model supplies to :func:`train`.

    init:     ``(rng, batch) -> variables`` (``{"params": ...}``, boxed with logical names).
    loss:     ``(params, batch, rng) -> (loss, metrics)``, pure, scalar float32 loss.
    batches:  ``(start_position, mesh) -> iterator`` of global batches placed on ``mesh``;
              the iterator's ``position`` attribute (batches produced so far) is checkpointed.
              A stream whose position is more than a number (webdataset shards) has
              ``state() -> dict`` (saved instead) and ``restore(dict)`` (called on resume);
              ``skipped_samples() -> {reason: count}`` is logged as ``data/skipped_<reason>``.
    example:  one global batch (numpy or arrays) fixing shapes for ``init`` and the shardings.
    evaluate: optional ``(state, step) -> {name: float}`` run on the host every ``eval_every``.
    samples:  optional ``(state, step) -> {name: uint8 [H, W, 3] grid}`` run every
              ``train.sample_every`` steps and at the end (every process: it samples under jit
              over the mesh); process 0 writes ``<workdir>/samples/<name>_<step>.png`` and
              sends the grids to the metric writers.
    """

    init: Callable[[jax.Array, dict], Any]
    loss: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
    batches: Callable[[int, Any], Iterator[dict]]
    example: dict
    evaluate: Callable[[TrainState, int], dict] | None = None
    samples: Callable[[TrainState, int], dict] | None = None


def micro_batches(batch: dict, k: int) -> dict:
    """Split every ``[B, …]`` leaf into ``[k, B/k, …]``: micro-batch ``i`` is rows
    ``i, i+k, i+2k, …`` (strided, not contiguous).

    Why strided: the global batch is sharded over (data, fsdp) in contiguous row blocks, one
    per device. Reshaping ``[B] → [B/k, k]`` keeps each device's block in place (it holds
    ``B/(k·n)`` whole groups of ``k`` rows when ``k·n`` divides ``B``) and micro-batch ``i`` is
    column ``i``, so every micro-batch is again spread evenly over all devices and the split
    moves no data. A contiguous split would put each micro-batch on a subset of the devices.
    """
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                             f"grad_accum_steps={k} equal micro-batches")
        x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def accumulated_value_and_grad(loss_fn, params, batch: dict, rng: jax.Array, k: int):
    """``((loss, metrics), grads)`` of ``loss_fn`` averaged over ``k`` micro-batches.

    One ``lax.scan`` over the micro-batches (see :func:`micro_batches`) sums loss, metrics and
    gradients in float32 and divides by ``k``; micro-batch ``i`` gets the key
    ``fold_in(rng, i)``. Peak activation memory is that of one micro-batch.

    This equals the full-batch gradient exactly (up to float rounding) only for a loss that is
    a mean of per-example terms whose random draws do not depend on how the batch is cut. The
    diffusion losses draw t, noise and condition dropout per batch from the key, so their
    accumulated step is an equally valid but *different* sample of the same objective. CLIP's
    contrastive loss is not a mean of per-example terms at all: each micro-batch only sees its
    own ``B/k`` negatives, so accumulation changes the objective (fewer negatives per row), and
    token-count-weighted means (DALL·E's text loss) become means of micro-batch means.
    """
    micro = micro_batches(batch, k)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731

    def body(carry, xs):
        i, mb = xs
        (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        total = (loss, metrics, grads)
        return jax.tree.map(lambda a, b: a + b, carry, f32(total)), None

    shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng))
    (loss0, metrics0), grads0 = shapes
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss0, metrics0, grads0))
    (loss, metrics, grads), _ = jax.lax.scan(body, zero, (jnp.arange(k), micro))
    loss, metrics, grads = jax.tree.map(lambda x: x / k, (loss, metrics, grads))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return (loss, metrics), grads


def train_step(state: TrainState, batch: dict, *, loss_fn, tx, ema_decay: float,
               grad_accum_steps: int = 1):
    """One update. A non-finite loss or gradient leaves params/opt/EMA unchanged (flagged).

    With ``grad_accum_steps = k > 1`` the gradient is the mean over ``k`` micro-batches
    computed in one scan (:func:`accumulated_value_and_grad`); ``k = 1`` is the plain step
    (the loss sees the step key itself, so runs without accumulation are unchanged).
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be ≥ 1, got {grad_accum_steps}")
    if grad_accum_steps == 1:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, state.step_rng())
    else:
        (loss, metrics), grads = accumulated_value_and_grad(
            loss_fn, state.params, batch, state.step_rng(), grad_accum_steps)
    leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    ok = jnp.isfinite(loss) & jnp.all(leaf_finite)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(params=params, opt_state=opt_state,
                        ema_params=ema_update(state.ema_params, params, ema_decay))
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    new = new.replace(step=state.step + 1, skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), finite=ok,
                   leaf_finite=leaf_finite)
    return new, metrics


def check_accumulation(batch_size: int, grad_accum_steps: int, mesh) -> None:
    """Fail unless ``batch_size`` splits into ``grad_accum_steps`` micro-batches that each
    split evenly over the mesh's data×fsdp devices."""
    if grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps must be ≥ 1, got {grad_accum_steps}")
    div = sharding.batch_divisor(mesh)
    if batch_size % (grad_accum_steps * div):
        raise ValueError(
            f"global batch size {batch_size} is not divisible by train.grad_accum_steps × the "
            f"mesh's data×fsdp size = {grad_accum_steps} × {div} = {grad_accum_steps * div}; "
            f"each micro-batch must split evenly over the devices — choose a batch size that "
            f"is a multiple of {grad_accum_steps * div}")


def _leaf_names(tree) -> list[str]:
    return ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def state_layout(cfg, task: Task, tx, mesh, rules):
    """``(make_state, rng, abstract_state, state_shardings)`` without allocating anything."""
    def make_state(rng):
        init_rng, run_rng = jax.random.split(rng)
        variables = task.init(init_rng, task.example)
        return TrainState.create(variables["params"], tx, run_rng, ema=cfg.train.ema_decay > 0)

    rng = jax.random.PRNGKey(cfg.train.seed)
    boxed = jax.eval_shape(make_state, rng)
    abstract, state_sh = sharding.abstract_with_shardings(boxed, mesh, rules)
    return make_state, rng, abstract, state_sh


def code_fingerprint() -> str:
    """A hash of the package's source files (every ``.py`` under ``unclip_jax``): processes of
    one run must run the same code."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def check_same_run(cfg: config_lib.ExperimentConfig, workdir: str | Path) -> None:
    """Fail on every process unless all processes run the same code, config (each section
    compared) and workdir; no-op with one process. Call it before anything else collective."""
    config_dict = config_lib.to_dict(cfg)
    items = {f"config.{key}": json.dumps(value, sort_keys=True)
             for key, value in config_dict.items()}
    items["code (unclip_jax sources)"] = code_fingerprint()
    items["--workdir"] = str(Path(workdir).absolute())
    sharding.check_processes_agree(
        items, hint="the workdir must be one folder on a file system every host sees")


def prepare_workdir(workdir: str | Path) -> Path:
    """Create ``workdir`` (and its parents) and make sure files can be written in it.

    Raises ``PermissionError`` naming the folder when it cannot be created (e.g. a parent is a
    regular file) or is not writable; the check writes a probe file, so it also holds for root
    on a read-only mount, where ``os.access`` alone says yes.
    """
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (workdir, *workdir.parents)
                        if p.exists() and not p.is_dir()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None
               else e.strerror or str(e))
        raise PermissionError(f"cannot create the workdir {workdir}: {why}; pass a --workdir "
                              f"in a folder you can write to") from None
    problem = None
    if not os.access(workdir, os.W_OK | os.X_OK):
        problem = "no write permission"
    else:
        try:
            with tempfile.TemporaryFile(dir=workdir, prefix=".write-probe-"):
                pass
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        raise PermissionError(f"the workdir {workdir.absolute()} is not writable ({problem}); "
                              f"checkpoints and metrics are written there — pass a --workdir "
                              f"in a folder you can write to")
    return workdir


def write_samples(workdir: Path, step: int, grids: dict, writers: MetricWriters) -> None:
    """Sample grids (``{name: uint8 [H, W, 3]}``) as ``<workdir>/samples/<name>_<step>.png``
    and to the metric writers; process 0 only."""
    if jax.process_index() != 0:
        return
    from PIL import Image

    out = Path(workdir) / "samples"
    out.mkdir(exist_ok=True)
    for name, grid in grids.items():
        Image.fromarray(np.asarray(grid, np.uint8)).save(out / f"{name}_{step:07d}.png")
    writers.images(step, grids)


def evaluate_checkpoint(cfg: config_lib.ExperimentConfig, task: Task, workdir: str | Path,
                        step: int | None = None) -> dict:
    """Restore the latest (or given) checkpoint of ``workdir`` and run ``task.evaluate``."""
    if task.evaluate is None:
        raise ValueError(f"task {cfg.task!r} has no evaluation")
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh.preset)
    ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt.directory}")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx = make_optimizer(cfg.optim, cfg.train.steps)
        _, _, abstract, _ = state_layout(cfg, task, tx, mesh, rules)
        state, _, _ = ckpt.restore(step, abstract)
        metrics = task.evaluate(state, step)
    ckpt.close()
    return {"step": int(step), **metrics}


def train(cfg: config_lib.ExperimentConfig, task: Task, workdir: str | Path, *,
          stop_after: int | None = None, progress: bool = True) -> TrainState:
    """Train ``task`` under ``cfg``, resuming from the latest complete checkpoint in ``workdir``.

    ``stop_after`` ends the run after that step without the final checkpoint (as a crash
    would); used by the kill-and-resume tests. Returns the final state.
    """
    tcfg = cfg.train
    if tcfg.on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.on_nonfinite must be one of {NONFINITE_POLICIES}, "
                         f"got {tcfg.on_nonfinite!r}")
    check_writers(tcfg.writers)
    workdir = prepare_workdir(workdir)
    check_same_run(cfg, workdir)       # several processes: the same code, config and workdir

    # --- mesh
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh.preset)
    sharding.check_batch_size(tcfg.batch_size, mesh)
    check_accumulation(tcfg.batch_size, tcfg.grad_accum_steps, mesh)
    tx = make_optimizer(cfg.optim, tcfg.steps)
    lr_at = learning_rate_schedule(cfg.optim, tcfg.steps)
    ckpt = Checkpointer(workdir, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoint)
    config_dict = config_lib.to_dict(cfg)
    if jax.process_index() == 0:       # multi-host: one writer of the shared workdir's files
        tmp = workdir / f".config.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        os.replace(tmp, workdir / "config.json")
    try:
        return _train(cfg, task, workdir, ckpt, config_dict, mesh, rules, tx, lr_at,
                      stop_after=stop_after, progress=progress)
    finally:
        try:
            ckpt.close()
        except Exception:   # noqa: BLE001 — the error that got us here is the one to report
            pass


def _train(cfg, task, workdir, ckpt, config_dict, mesh, rules, tx, lr_at, *, stop_after,
           progress) -> TrainState:
    tcfg = cfg.train
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # --- abstract init → shardings
        make_state, rng, abstract, state_sh = state_layout(cfg, task, tx, mesh, rules)
        batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, np.ndim(x)), task.example)

        # --- init or restore
        start = ckpt.latest_step()
        if start is None:
            state = jax.jit(lambda r: nn.meta.unbox(make_state(r)), out_shardings=state_sh)(rng)
            position, start = 0, 0
        else:
            state, data, _ = ckpt.restore(start, abstract)
            position = int(data["position"])
            print(f"resumed from {ckpt.directory / str(start)} (step {start}, data position "
                  f"{position})", flush=True)
        batches = task.batches(position, mesh)
        if start and hasattr(batches, "restore"):
            batches.restore(data)
        data_state = getattr(batches, "state", None) or (
            lambda: {"position": int(batches.position)})
        leaf_names = _leaf_names(abstract.params)

        # --- update step
        step_fn = jax.jit(
            functools.partial(train_step, loss_fn=task.loss, tx=tx, ema_decay=tcfg.ema_decay,
                              grad_accum_steps=tcfg.grad_accum_steps),
            in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
            donate_argnums=0)

        def check(step: int, m: dict) -> None:
            if bool(m["finite"]):
                return
            bad = np.flatnonzero(~np.asarray(m["leaf_finite"]))
            where = (f"first non-finite gradient leaf: {leaf_names[bad[0]]}" if bad.size
                     else f"loss = {float(m['loss'])}, gradients finite")
            if tcfg.on_nonfinite == "skip":
                tqdm.write(f"step {step}: non-finite update skipped ({where})")
                return
            ckpt.wait()
            last = ckpt.latest_step()
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step} ({where}); stopped without "
                f"saving — the last good checkpoint "
                f"{'(step ' + str(last) + ')' if last is not None else '(none yet)'} is untouched. "
                f"Set train.on_nonfinite=skip to skip such steps instead.")

        # --- loop (process 0 writes the logs; every process saves its checkpoint shards)
        main = jax.process_index() == 0
        writers = MetricWriters(workdir, tcfg.writers, start_step=start, main=main,
                                run_name=cfg.name, config=config_dict,
                                wandb_project=tcfg.wandb_project)
        bar = tqdm(total=tcfg.steps, initial=start, desc=f"train {cfg.name}",
                   disable=not (progress and main), dynamic_ncols=True)
        pending: list[tuple[int, dict]] = []
        t_last, steps_since = time.perf_counter(), 0
        step = start
        try:
            while step < tcfg.steps:
                batch = next(batches)
                batch = {k: batch[k] for k in task.example}   # the model's inputs only
                state, m = step_fn(state, batch)
                step += 1
                steps_since += 1
                bar.update(1)
                # Lag-1 guard keeps the device busy: check the previous step while this runs.
                if pending:
                    check(*pending[-1])
                pending = [(step, m)]
                is_last = step == tcfg.steps
                do_log = step % tcfg.log_every == 0 or is_last
                do_eval = task.evaluate is not None and (
                    (is_last and tcfg.eval_at_end)
                    or (tcfg.eval_every and step % tcfg.eval_every == 0))
                do_ckpt = is_last or (tcfg.ckpt_every and step % tcfg.ckpt_every == 0)
                do_samples = task.samples is not None and tcfg.sample_every > 0 and (
                    is_last or step % tcfg.sample_every == 0)
                if do_log or do_eval or do_ckpt or do_samples:
                    check(step, m)
                    pending = []
                if do_log:
                    now = time.perf_counter()
                    row = {"step": step, "lr": float(lr_at(step - 1)),
                           "steps_per_s": steps_since / max(now - t_last, 1e-9),
                           "skipped": int(state.skipped)}
                    row.update({k: float(v) for k, v in m.items()
                                if k not in ("finite", "leaf_finite")})
                    if hasattr(batches, "skipped_samples"):     # a collective
                        row.update({f"data/skipped_{k}": v
                                    for k, v in batches.skipped_samples().items()})
                    t_last, steps_since = now, 0
                    writers.scalars(step, {k: v for k, v in row.items() if k != "step"})
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                    tqdm.write(f"step {step}: " + " ".join(
                        f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
                if do_ckpt:
                    ckpt.save(step, state, data_state(), config_dict)
                    writers.flush()
                if do_eval:
                    ev = task.evaluate(state, step)
                    writers.scalars(step, {f"eval/{k}": v for k, v in ev.items()})
                    tqdm.write(f"eval @ {step}: " + " ".join(f"{k}={v:.4g}"
                                                             for k, v in ev.items()))
                if do_samples:
                    write_samples(workdir, step, task.samples(state, step), writers)
                if stop_after is not None and step >= stop_after:
                    break
        finally:
            writers.close()
            if hasattr(batches, "close"):
                batches.close()
        bar.close()
        if pending:
            check(*pending[-1])
        ckpt.wait()
    return state
