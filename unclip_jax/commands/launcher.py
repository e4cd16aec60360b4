"""Several JAX processes on this machine, as the hosts of a pod slice would run: the local
multi-process launcher (``unclip-jax launch``) and what the multi-process tests build on.

Process ``i`` of ``N`` gets the environment a hand-started host gets (``docs/multihost.md``):
``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``, ``JAX_NUM_PROCESSES=N``, ``JAX_PROCESS_ID=i``, and
``M`` CPU devices (``--xla_force_host_platform_device_count=M`` in ``XLA_FLAGS``,
``JAX_PLATFORMS=cpu``). :func:`unclip_jax.core.sharding.maybe_initialize_distributed` then joins
them; collectives between processes go over gloo (TCP), JAX's default CPU collectives
(``jax_cpu_collectives_implementation``). Every process runs the same command, its output
goes to ``<log_dir>/process_<i>.log`` (and, when ``echo``, to this terminal prefixed ``[i]``).

Failures are bounded: when one process fails, the others get ``grace`` seconds to stop (a JAX
process whose peer died stops on its own once the coordination service misses the peer's
heartbeats, :data:`unclip_jax.core.sharding.HEARTBEAT_ENV`) and are then killed; when the whole
run exceeds ``timeout`` every process still running is killed. Either way
:class:`LaunchError` names each process, its state (exit code, killed after the timeout) and
the end of its log.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DEVICE_FLAG = "--xla_force_host_platform_device_count"


class LaunchError(RuntimeError):
    """A launched process failed, or a process was still running after the time limit."""

    def __init__(self, message: str, results: list["ProcessResult"]):
        super().__init__(message)
        self.results = results


@dataclasses.dataclass
class ProcessResult:
    """One process of a launch: ``returncode`` (negative: killed by that signal; None: still
    running), ``stuck`` (killed by the launcher: past the timeout or the grace after a peer
    failed), ``log`` (its stdout and stderr), ``seconds`` (its wall time)."""

    index: int
    pid: int
    returncode: int | None
    stuck: bool
    log: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.stuck

    def state(self) -> str:
        if self.stuck:
            return "still running (killed by the launcher)"
        if self.returncode is None:
            return "running"
        if self.returncode < 0:
            return f"killed by signal {signal.Signals(-self.returncode).name}"
        return f"exit code {self.returncode}"


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, devices: int) -> str:
    """``xla_flags`` with the host-platform device count set to ``devices`` (replacing any)."""
    kept = re.sub(rf"{DEVICE_FLAG}=\S*", "", xla_flags or "").split()
    return " ".join(kept + [f"{DEVICE_FLAG}={devices}"])


def process_env(index: int, processes: int, devices: int, address: str,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``index`` of ``processes`` with ``devices`` CPU devices."""
    env = dict(os.environ if base is None else base)
    for key in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "UNCLIP_JAX_CPU_DEVICES"):
        env.pop(key, None)             # another launcher's variables would confuse detection
    env.update({
        "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(processes),
        "JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": with_device_count(env.get("XLA_FLAGS", ""), devices),
        "PYTHONUNBUFFERED": "1",
    })
    if processes == 1:   # one process: no coordinator (what a single-host run does)
        for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            env.pop(key)
    return env


def resolve_command(argv: Sequence[str]) -> list[str]:
    """``unclip-jax …`` and ``python …`` run with this interpreter (so a venv need not be
    activated); anything else as given."""
    argv = list(argv)
    if not argv:
        raise ValueError("no command to launch: pass it after --, e.g. "
                         "`unclip-jax launch -n 2 -- unclip-jax train CONFIG --workdir DIR`")
    if argv[0] == "unclip-jax":
        return [sys.executable, "-m", "unclip_jax.commands.cli", *argv[1:]]
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return argv


class LocalCluster:
    """``processes`` JAX processes with ``devices`` CPU devices each, running ``argv``.

    ``start()`` launches them; ``wait()`` returns their results or raises :class:`LaunchError`;
    ``kill(i)`` sends SIGKILL to process ``i`` (the tests' host failure). ``env`` adds
    variables to every process; ``per_process_env`` maps an index to variables of that process
    only (a test gives one process another config).
    """

    def __init__(self, argv: Sequence[str], *, processes: int = 2, devices: int = 2,
                 timeout: float = 600.0, grace: float = 60.0,
                 log_dir: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None,
                 per_process_env: Mapping[int, Mapping[str, str]] | None = None,
                 per_process_args: Mapping[int, Sequence[str]] | None = None,
                 echo: bool = False, port: int | None = None):
        if processes < 1 or devices < 1:
            raise ValueError(f"need at least one process and one device per process, got "
                             f"processes={processes}, devices={devices}")
        self.argv = resolve_command(argv)
        self.processes, self.devices = processes, devices
        self.timeout, self.grace = float(timeout), float(grace)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="unclip-jax-launch-"))
        self.cwd, self.echo = cwd, echo
        self.env, self.per_process_env = dict(env or {}), dict(per_process_env or {})
        self.per_process_args = dict(per_process_args or {})
        self.address = f"127.0.0.1:{port or free_port()}"
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._t0 = self._ends = None

    def log_path(self, index: int) -> Path:
        return self.log_dir / f"process_{index}.log"

    def start(self) -> "LocalCluster":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        self._ends = [None] * self.processes
        for i in range(self.processes):
            env = process_env(i, self.processes, self.devices, self.address)
            env.update(self.env)
            env.update(self.per_process_env.get(i, {}))
            argv = self.argv + list(self.per_process_args.get(i, ()))
            proc = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            self.procs.append(proc)
            thread = threading.Thread(target=self._pump, args=(i, proc), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _pump(self, index: int, proc: subprocess.Popen) -> None:
        with open(self.log_path(index), "wb") as log:
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                if self.echo:
                    sys.stdout.write(f"[{index}] " + line.decode("utf-8", "replace"))
                    sys.stdout.flush()

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL) to process ``index``."""
        proc = self.procs[index]
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def wait(self, check: bool = True) -> list[ProcessResult]:
        """Wait for every process (at most ``timeout`` since the start; ``grace`` after the
        first failure) and return the results; with ``check``, raise :class:`LaunchError`
        unless all exited 0."""
        stuck = [False] * self.processes
        failed_at = None
        while True:
            now = time.monotonic()
            codes = [p.poll() for p in self.procs]
            for i, c in enumerate(codes):
                if c is not None and self._ends[i] is None:
                    self._ends[i] = now
            if all(c is not None for c in codes):
                break
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            over_time = now - self._t0 > self.timeout
            over_grace = failed_at is not None and now - failed_at > self.grace
            if over_time or over_grace:
                for i, c in enumerate(codes):
                    if c is None:
                        stuck[i] = True
                        self._kill_group(self.procs[i])
                for p in self.procs:
                    p.wait()
                break
            time.sleep(0.1)
        for t in self._threads:
            t.join(timeout=10)
        end = time.monotonic()
        results = [ProcessResult(i, p.pid, p.returncode, stuck[i], self.read_log(i),
                                 (self._ends[i] or end) - self._t0)
                   for i, p in enumerate(self.procs)]
        if check and not all(r.ok for r in results):
            raise LaunchError(self.describe_failure(results, failed_at is not None), results)
        return results

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)     # the process and anything it started
        except ProcessLookupError:
            pass

    def read_log(self, index: int) -> str:
        path = self.log_path(index)
        return path.read_text(errors="replace") if path.is_file() else ""

    def describe_failure(self, results: list[ProcessResult], peer_failed: bool) -> str:
        stuck = [r.index for r in results if r.stuck]
        cmd = shlex.join(self.argv)
        if stuck and not peer_failed:
            head = (f"process(es) {', '.join(map(str, stuck))} of {self.processes} still "
                    f"running after the {self.timeout:.0f} s limit (hung?) and killed")
        elif stuck:
            head = (f"a process failed and process(es) {', '.join(map(str, stuck))} did not "
                    f"stop within {self.grace:.0f} s after it (stuck waiting for the failed "
                    f"peer?) and were killed")
        else:
            bad = [r.index for r in results if not r.ok]
            head = f"process(es) {', '.join(map(str, bad))} of {self.processes} failed"
        parts = [f"{head}: {cmd}  (coordinator {self.address}, {self.devices} CPU device(s) "
                 f"per process, logs in {self.log_dir})"]
        for r in results:
            tail = "\n".join("    " + line for line in r.log.splitlines()[-25:])
            parts.append(f"  process {r.index} (pid {r.pid}): {r.state()} after "
                         f"{r.seconds:.1f} s; last lines of {self.log_path(r.index)}:\n{tail}")
        return "\n".join(parts)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                self._kill_group(p)
                p.wait()


def launch(argv: Sequence[str], *, processes: int = 2, devices: int = 2,
           timeout: float = 600.0, check: bool = True, **kwargs) -> list[ProcessResult]:
    """Run ``argv`` in ``processes`` JAX processes of ``devices`` CPU devices each on this
    machine and wait for them (see :class:`LocalCluster` for the other arguments)."""
    cluster = LocalCluster(argv, processes=processes, devices=devices, timeout=timeout,
                           **kwargs)
    with cluster:
        return cluster.wait(check=check)
