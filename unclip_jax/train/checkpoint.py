"""Checkpoints with orbax: train state, data position and config (JSON) in one step folder.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` when
complete, so a run killed mid-write leaves no step that ``latest_step`` would pick up (it also
checks that the step's three items are on disk); leftover temporary folders are removed when the
next run opens the folder. Saves are asynchronous (the loop keeps training while the previous
save finishes) and only the newest ``keep`` are kept. A save that fails (disk full, I/O error)
raises :class:`CheckpointWriteError` naming the step and the last complete checkpoint, which the
failed write never touches.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint in a workdir does not fit the model/config being run."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error); earlier steps are intact."""


ITEMS = ("state", "data", "config")


class Checkpointer:
    """Save / restore ``{state, data, config}`` under ``<workdir>/checkpoints/<step>``."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self._in_flight: int | None = None     # step of the asynchronous save not yet waited on
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(f"checkpoint directory {self.directory} is not writable")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        """The newest complete step (never a temporary, half-written one), or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Complete steps, oldest first: committed by orbax and holding every item."""
        return sorted(s for s in self._manager.all_steps() if self._complete(s))

    def _complete(self, step: int) -> bool:
        d = self.directory / str(step)
        return all((d / item).is_dir() for item in ITEMS) and all(
            (d / item / "metadata").is_file() for item in ("data", "config"))

    def save(self, step: int, state: Any, data: dict, config: dict) -> None:
        """Start saving ``state`` (a pytree of jax.Arrays) with the data position and config.

        Raises :class:`CheckpointWriteError` when this save, or the previous asynchronous one
        (whose failure surfaces here), cannot be written.
        """
        try:
            self._manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data),
                    config=ocp.args.JsonSave(config),
                ),
                force=True,
            )
        except CheckpointWriteError:
            raise
        except OSError as e:
            failed = self._in_flight if self._in_flight is not None else int(step)
            self._in_flight = None
            raise self._write_error(failed, e) from e
        self._in_flight = int(step)

    def wait(self) -> None:
        """Block until every pending asynchronous save is complete on disk.

        Raises :class:`CheckpointWriteError` when the pending save failed.
        """
        try:
            self._manager.wait_until_finished()
        except OSError as e:
            failed, self._in_flight = self._in_flight, None
            raise self._write_error(failed, e) from e
        self._in_flight = None

    def _write_error(self, step: int | None, e: OSError) -> CheckpointWriteError:
        name = errno.errorcode.get(e.errno, "") if e.errno else ""
        cause = f"{e.strerror or e}" + (f" ({name})" if name else "")
        last = self.latest_step()
        hint = ("free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else "fix the problem")
        return CheckpointWriteError(
            e.errno, f"could not write checkpoint step {step} under {self.directory}: {cause}. "
            f"The incomplete write is ignored; the last complete checkpoint "
            f"{'is step ' + str(last) if last is not None else 'does not exist yet'} and is "
            f"intact — {hint}, then re-run the same command to resume from it.")

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raise :class:`CheckpointMismatchError` naming every path whose shape differs.

        ``abstract_state`` is the ``jax.eval_shape`` of the state the current config would
        build. Missing and unexpected parameter paths are listed too.
        """
        stored = self._manager.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored)
        want = _shapes_by_path(abstract_state)
        have = _shapes_by_path(stored)
        problems = []
        for path in sorted(set(want) | set(have)):
            if path not in have:
                problems.append(f"  {path}: missing in the checkpoint (config wants {want[path]})")
            elif path not in want:
                problems.append(f"  {path}: in the checkpoint {have[path]}, not in the config")
            elif tuple(want[path]) != tuple(have[path]):
                problems.append(f"  {path}: checkpoint shape {tuple(have[path])}, "
                                f"config shape {tuple(want[path])}")
        if problems:
            shown = problems[:20] + ([f"  ... and {len(problems) - 20} more"]
                                     if len(problems) > 20 else [])
            raise CheckpointMismatchError(
                f"the checkpoint at {self.directory / str(step)} does not match this "
                f"model/config ({len(problems)} mismatching entries):\n" + "\n".join(shown)
                + "\nUse another --workdir, or the config the checkpoint was trained with "
                  f"(saved in {self.directory / str(step) / 'config'}).")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore ``(state, data, config)``; the state takes the shardings of
        ``abstract_state``."""
        self.check_compatible(step, abstract_state)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return out.state, dict(out.data), dict(out.config)

    def restore_params(self, step: int | None = None, which: str = "params") -> Any:
        """Restore only ``state[which]`` (e.g. "params" or "ema_params") on this process's
        first device, whatever the device layout the run was trained on (a demo trained
        data-parallel on several CPU devices loads into a one-device notebook)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        stored = self._manager.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
            if hasattr(m, "shape") and hasattr(m, "dtype") else m, stored)
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return out.state[which]

    def read_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return json.loads((self.directory / str(step) / "config" / "metadata").read_text())

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _shapes_by_path(tree: Any) -> dict[str, tuple]:
    """``{"params/clip/kernel": shape}`` for every array-like leaf of ``tree``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            shape = np.shape(leaf)
        out["/".join(_key_name(k) for k in path)] = tuple(shape)
    return out


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
