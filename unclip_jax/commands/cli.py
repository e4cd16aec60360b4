"""``unclip-jax train|eval|tokenizer|data|demo …`` — the command-line entry points."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def _train(args) -> None:
    from unclip_jax.core import config as config_lib
    from unclip_jax.core import sharding
    from unclip_jax.train import loop, tasks

    sharding.maybe_initialize_distributed()   # multi-host launches; before any computation
    cfg = config_lib.load_config(args.config, args.set)
    loop.prepare_workdir(args.workdir)
    loop.check_same_run(cfg, args.workdir)    # several processes: same code, config, workdir
    cfg, task = tasks.build_task(cfg, args.workdir)
    loop.train(cfg, task, args.workdir)


def _evaluate(args) -> None:
    from unclip_jax.core import config as config_lib
    from unclip_jax.train import loop, tasks

    cfg = config_lib.load_config(args.config, args.set)
    cfg, task = tasks.build_task(cfg, args.workdir)
    metrics = loop.evaluate_checkpoint(cfg, task, args.workdir, args.step)
    print(json.dumps(metrics, indent=2))
    if args.out and _writer():
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")


def _writer() -> bool:
    """Whether this process writes a command's output files (several processes: process 0)."""
    import jax

    return jax.process_index() == 0


def _on_process_0(name: str, fn) -> None:
    """Run ``fn`` on process 0 only; every process waits until it is done."""
    from unclip_jax.core import sharding

    if _writer():
        fn()
    sharding.barrier(name)


def _tokenizer_train(args) -> None:
    from unclip_jax.core.config import DataConfig
    from unclip_jax.core.text import train_tokenizer_from_dataset
    from unclip_jax.data import input_pipeline
    from unclip_jax.train.tasks import ensure_dataset

    data_cfg = DataConfig(name=args.data, data_dir=args.data_dir)
    ensure_dataset(data_cfg)

    def train():
        tok = train_tokenizer_from_dataset(input_pipeline.open_source(data_cfg, "train"),
                                           args.out, args.vocab_size)
        print(f"wrote {args.out} ({tok.vocab_size} tokens)")

    _on_process_0(f"tokenizer {args.out}", train)


def _data_shapes(args) -> None:
    from unclip_jax.data.captioned_shapes import build_captioned_shapes, dataset_name

    sizes = dict(num_train=args.num_train, num_validation=args.num_validation,
                 num_test=args.num_test, seed=args.seed)
    _on_process_0("data shapes", lambda: build_captioned_shapes(
        args.data_dir, resolution=args.resolution, **sizes))
    print(f"built {dataset_name(args.resolution, **sizes)} in {args.data_dir}")


def _data_captions(args) -> None:
    from unclip_jax.data.image_captions import build_image_captions

    def build():
        _, summary = build_image_captions(args.source, args.data_dir, args.name,
                                          resolution=args.resolution,
                                          val_fraction=args.val_fraction, seed=args.seed)
        print(summary)

    _on_process_0("data captions", build)


def _demo(args) -> None:
    from unclip_jax.commands import demo
    from unclip_jax.core import sharding

    sharding.split_cpu_cores()       # data-parallel over the cores of a CPU-only machine

    stages = demo.STAGES[: demo.STAGES.index(args.until) + 1]
    demo.run(args.workdir, config_dir=args.config_dir, overrides=args.set, stages=stages)


def demo_stages() -> tuple[str, ...]:
    from unclip_jax.commands.demo import STAGES

    return STAGES


# Modules that add their own sub-commands: each defines ``add_commands(subparsers)`` and sets
# ``fn`` on its parsers (imported lazily only when the module exists).
COMMAND_MODULES = (
    "unclip_jax.commands.prior",
    "unclip_jax.commands.decoder",
    "unclip_jax.commands.dalle",
    "unclip_jax.commands.unclip",
    "unclip_jax.commands.describe",
    "unclip_jax.commands.convert",
    "unclip_jax.commands.launch",
    "unclip_jax.commands.coco",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unclip-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add_config_args(q):
        q.add_argument("config", help="config file defining get_config()")
        q.add_argument("--workdir", required=True, help="checkpoints, metrics and tokenizer")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.steps=100 (repeatable)")

    q = sub.add_parser("train", help="train (or resume) the model of a config")
    add_config_args(q)
    q.set_defaults(fn=_train)

    q = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
    add_config_args(q)
    q.add_argument("--step", type=int, default=None)
    q.add_argument("--out", default=None, help="also write the metrics JSON here")
    q.set_defaults(fn=_evaluate)

    q = sub.add_parser("tokenizer", help="tokenizer utilities")
    tsub = q.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train a sentencepiece BPE on a dataset's captions")
    t.add_argument("--data", required=True, help="dataset name, e.g. captioned_shapes/r32")
    t.add_argument("--data-dir", default="data/prepared")
    t.add_argument("--vocab-size", type=int, default=512)
    t.add_argument("--out", required=True)
    t.set_defaults(fn=_tokenizer_train)

    q = sub.add_parser("data", help="prepare datasets")
    dsub = q.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("shapes", help="render the captioned-shapes dataset")
    d.add_argument("--resolution", type=int, default=64)
    d.add_argument("--data-dir", default="data/prepared")
    d.add_argument("--num-train", type=int, default=20_000)
    d.add_argument("--num-validation", type=int, default=2_000)
    d.add_argument("--num-test", type=int, default=2_000)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_data_shapes)
    d = dsub.add_parser("captions", help="a folder or CSV/JSONL manifest of image–caption pairs")
    d.add_argument("--source", required=True)
    d.add_argument("--name", required=True)
    d.add_argument("--resolution", type=int, default=64)
    d.add_argument("--data-dir", default="data/prepared")
    d.add_argument("--val-fraction", type=float, default=0.05)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_data_captions)

    q = sub.add_parser("demo", help="the main job on the built-in shapes data")
    q.add_argument("--workdir", default="runs/demo")
    q.add_argument("--config-dir", default="experiments/shapes")
    q.add_argument("--until", default=demo_stages()[-1], choices=demo_stages(),
                   help="last stage to run (default: the whole chain)")
    q.add_argument("--set", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                   help="config override of one trained stage (clip, prior, decoder, "
                        "upsampler), e.g. decoder:train.steps=2000; no prefix = clip")
    q.set_defaults(fn=_demo)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unclip_jax.train.checkpoint import CheckpointWriteError
    from unclip_jax.train.loop import NonFiniteError

    try:
        if args.command != "launch":     # the launcher starts processes; it never joins them
            from unclip_jax.core import sharding

            sharding.maybe_initialize_distributed()   # a multi-host launch; before computing
        args.fn(args)
    except (KeyError, ValueError, FileNotFoundError, PermissionError, ConnectionError,
            CheckpointWriteError, NonFiniteError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"unclip-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
