"""The one generic training loop. Each model supplies a :class:`Task` (init, loss, data, eval).

Sections, in order: mesh → input → ``jax.eval_shape(init)`` → shardings → ``jit(init,
out_shardings)`` or restore → update step (``jit`` with in/out shardings and donation) → loop
(progress bar, JSONL metrics, periodic eval, checkpoints, non-finite guard).
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

from unclip_jax import config as config_lib
from unclip_jax import sharding
from unclip_jax.train.checkpoint import Checkpointer
from unclip_jax.train.optim import learning_rate_schedule, make_optimizer
from unclip_jax.train.state import TrainState, ema_update

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
    example:  one global batch (numpy or arrays) fixing shapes for ``init`` and the shardings.
    evaluate: optional ``(state, step) -> {name: float}`` run on the host every ``eval_every``.
    """

    init: Callable[[jax.Array, dict], Any]
    loss: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
    batches: Callable[[int, Any], Iterator[dict]]
    example: dict
    evaluate: Callable[[TrainState, int], dict] | None = None


def train_step(state: TrainState, batch: dict, *, loss_fn, tx, ema_decay: float):
    """One update. A non-finite loss or gradient leaves params/opt/EMA unchanged (flagged)."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, state.step_rng())
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


def _leaf_names(tree) -> list[str]:
    return ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _state_layout(cfg, task: Task, tx, mesh, rules):
    """``(make_state, rng, abstract_state, state_shardings)`` without allocating anything."""
    def make_state(rng):
        init_rng, run_rng = jax.random.split(rng)
        variables = task.init(init_rng, task.example)
        return TrainState.create(variables["params"], tx, run_rng, ema=cfg.train.ema_decay > 0)

    rng = jax.random.PRNGKey(cfg.train.seed)
    boxed = jax.eval_shape(make_state, rng)
    abstract, state_sh = sharding.abstract_with_shardings(boxed, mesh, rules)
    return make_state, rng, abstract, state_sh


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


def truncate_log(path: Path, last_step: int) -> None:
    """Keep only the rows of the JSONL log at ``path`` up to ``last_step`` (the step a run
    resumes from), dropping rows a killed run wrote after its last checkpoint and a torn last
    line, so a resumed run's log reads like the uninterrupted run's. Atomic (write + rename)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


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
        _, _, abstract, _ = _state_layout(cfg, task, tx, mesh, rules)
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
    workdir = prepare_workdir(workdir)

    # --- mesh
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh.preset)
    sharding.check_batch_size(tcfg.batch_size, mesh)
    tx = make_optimizer(cfg.optim, tcfg.steps)
    lr_at = learning_rate_schedule(cfg.optim, tcfg.steps)
    ckpt = Checkpointer(workdir, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoint)
    config_dict = config_lib.to_dict(cfg)
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
        make_state, rng, abstract, state_sh = _state_layout(cfg, task, tx, mesh, rules)
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
        leaf_names = _leaf_names(abstract.params)

        # --- update step
        step_fn = jax.jit(
            functools.partial(train_step, loss_fn=task.loss, tx=tx, ema_decay=tcfg.ema_decay),
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

        # --- loop
        log_path = workdir / "metrics.jsonl"
        truncate_log(log_path, start)
        bar = tqdm(total=tcfg.steps, initial=start, desc=f"train {cfg.name}",
                   disable=not progress, dynamic_ncols=True)
        pending: list[tuple[int, dict]] = []
        t_last, steps_since = time.perf_counter(), 0
        step = start
        with open(log_path, "a") as log_file:
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
                if do_log or do_eval or do_ckpt:
                    check(step, m)
                    pending = []
                if do_log:
                    now = time.perf_counter()
                    row = {"step": step, "lr": float(lr_at(step - 1)),
                           "steps_per_s": steps_since / max(now - t_last, 1e-9),
                           "skipped": int(state.skipped)}
                    row.update({k: float(v) for k, v in m.items()
                                if k not in ("finite", "leaf_finite")})
                    t_last, steps_since = now, 0
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                    tqdm.write(f"step {step}: " + " ".join(
                        f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
                if do_ckpt:
                    ckpt.save(step, state, {"position": int(batches.position)}, config_dict)
                if do_eval:
                    ev = task.evaluate(state, step)
                    log_file.write(json.dumps({"step": step, **{f"eval/{k}": v
                                                              for k, v in ev.items()}}) + "\n")
                    log_file.flush()
                    tqdm.write(f"eval @ {step}: " + " ".join(f"{k}={v:.4g}"
                                                             for k, v in ev.items()))
                if stop_after is not None and step >= stop_after:
                    break
        bar.close()
        if pending:
            check(*pending[-1])
        ckpt.wait()
    return state
