"""``unclip-jax describe CONFIG [--mesh data=…,fsdp=…,model=…] [--batch N]``: parameter count
and per-device memory of a config, computed with ``jax.eval_shape`` (nothing is allocated)."""

from __future__ import annotations

import json

from unclip_jax.core.sharding import MESH_AXES, PRESETS


def parse_mesh(text: str) -> tuple[int, int, int]:
    """``"data=8,fsdp=16,model=1"`` → ``(8, 16, 1)``; omitted axes are 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in (s.strip() for s in text.split(",") if s.strip()):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in sizes:
            raise ValueError(f"--mesh entry {item!r} must be AXIS=SIZE with AXIS one of "
                             f"{', '.join(MESH_AXES)}")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {key} expects a positive int, got {value!r}") from None
        if sizes[key] < 1:
            raise ValueError(f"--mesh {key} expects a positive int, got {sizes[key]}")
    return tuple(sizes[a] for a in MESH_AXES)


def _describe(args) -> None:
    from unclip_jax.core import config as config_lib
    from unclip_jax.pipelines.describe import describe, format_table

    cfg = config_lib.load_config(args.config, args.set)
    mesh = parse_mesh(args.mesh) if args.mesh else None
    out = describe(cfg, mesh, args.batch, args.preset)
    print(json.dumps(out, indent=2) if args.json else format_table(out))


def add_commands(subparsers) -> None:
    q = subparsers.add_parser("describe", help="parameter count and per-device memory of a "
                                               "config (no allocation)")
    q.add_argument("config", help="config file defining get_config()")
    q.add_argument("--mesh", default="", metavar="data=N,fsdp=N,model=N",
                   help="mesh sizes (default: the config's, a -1 axis read as 1)")
    q.add_argument("--batch", type=int, default=None, help="global batch (default: config's)")
    q.add_argument("--preset", default=None, choices=PRESETS,
                   help="sharding preset (default: the config's mesh.preset)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    q.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    q.set_defaults(fn=_describe)
