"""Where a run's metrics and images go: ``metrics.jsonl`` always, TensorBoard and W&B on demand.

``train.writers`` names the writers besides the JSONL log: ``tensorboard`` (the default; event
files in ``<workdir>/tensorboard`` through ``tensorboardX``: scalars and images) and ``wandb``
(Weights & Biases, imported only when asked for; it must be installed). Only process 0 writes;
on every other process the writers do nothing. A resumed run truncates ``metrics.jsonl`` to the
step it resumes from and starts a new event file whose ``purge_step`` tells TensorBoard to drop
the events a killed run wrote after that step, so both read like the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

WRITERS = ("tensorboard", "wandb")


def check_writers(names) -> None:
    bad = [n for n in names if n not in WRITERS]
    if bad:
        raise ValueError(f"unknown metric writer(s) {', '.join(map(repr, bad))} in train.writers; "
                         f"accepted: {', '.join(WRITERS)} (metrics.jsonl is always written)")


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


class MetricWriters:
    """``scalars(step, {name: float})`` and ``images(step, {name: uint8 [H, W, 3]})`` to every
    configured writer; ``flush()``, ``close()``. ``main=False``: writes nothing."""

    def __init__(self, workdir: str | Path, names=("tensorboard",), *, start_step: int = 0,
                 main: bool = True, run_name: str = "", config: dict | None = None,
                 wandb_project: str = ""):
        check_writers(names)
        self.main = main
        self.workdir = Path(workdir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        truncate_log(path, start_step)
        self._jsonl = open(path, "a")
        if "tensorboard" in names:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"),
                                     purge_step=start_step or None, flush_secs=30)
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ImportError("train.writers includes wandb, which is not installed: "
                                  "`pip install wandb`, or leave it out of train.writers "
                                  f"(accepted: {', '.join(WRITERS)})") from None
            id_file = self.workdir / "wandb_id.txt"
            if not id_file.is_file():
                id_file.write_text(wandb.util.generate_id())
            self._wandb = wandb.init(project=wandb_project or "unclip_jax", name=run_name or None,
                                     id=id_file.read_text().strip(), resume="allow",
                                     dir=str(self.workdir), config=config or {})

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.main:
            return
        row = {"step": int(step), **values}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        numeric = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Images (uint8 ``[H, W, 3]``) to the writers that take images (not the JSONL log)."""
        if not self.main:
            return
        if self._tb is not None:
            for k, img in images.items():
                self._tb.add_image(k, np.asarray(img, np.uint8), int(step), dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({k: wandb.Image(np.asarray(img, np.uint8))
                             for k, img in images.items()}, step=int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
