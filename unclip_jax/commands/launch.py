"""``unclip-jax launch -n N -d M -- COMMAND …``: COMMAND in N JAX processes on this machine,
M CPU devices each — a pod slice's hosts, simulated (:mod:`unclip_jax.commands.launcher`)."""

from __future__ import annotations

import sys


def _launch(args) -> None:
    from unclip_jax.commands import launcher as launch

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    cluster = launch.LocalCluster(command, processes=args.processes, devices=args.devices,
                                  timeout=args.timeout, grace=args.grace,
                                  log_dir=args.log_dir, echo=not args.quiet)
    print(f"launching {args.processes} process(es) × {args.devices} CPU device(s), "
          f"coordinator {cluster.address}, logs in {cluster.log_dir}", flush=True)
    with cluster:
        try:
            results = cluster.wait()
        except launch.LaunchError as e:
            print(f"unclip-jax launch: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    times = ", ".join(f"process {r.index}: {r.seconds:.1f} s" for r in results)
    print(f"all {len(results)} processes exited 0 ({times}); logs in {cluster.log_dir}")


def add_commands(subparsers) -> None:
    q = subparsers.add_parser(
        "launch", help="run a command as N JAX processes on this machine (a multi-host "
                       "run, simulated on CPU devices)",
        description="Run COMMAND in N JAX processes on localhost with M CPU devices each, "
                    "joined like the hosts of a pod slice (coordinator on 127.0.0.1, gloo "
                    "collectives). Example: unclip-jax launch -n 2 -d 2 -- unclip-jax train "
                    "experiments/shapes/clip.py --workdir runs/clip_2proc")
    q.add_argument("-n", "--processes", type=int, default=2)
    q.add_argument("-d", "--devices", type=int, default=2, help="CPU devices per process")
    q.add_argument("--timeout", type=float, default=3600.0,
                   help="kill every process still running after this many seconds and name "
                        "it (default 3600)")
    q.add_argument("--grace", type=float, default=120.0,
                   help="after one process fails, seconds the others get to stop before "
                        "they are killed (default 120)")
    q.add_argument("--log-dir", default=None,
                   help="process_<i>.log per process (default: a new temporary folder)")
    q.add_argument("--quiet", action="store_true",
                   help="do not echo the processes' output here (it is in the logs)")
    q.add_argument("command", nargs="+", metavar="-- COMMAND",
                   help="the command every process runs, e.g. unclip-jax train CONFIG "
                        "--workdir DIR (unclip-jax / python run with this interpreter)")
    q.set_defaults(fn=_launch)
