"""The local multi-process launcher on plain Python commands (no JAX in the children): each
process gets its own id, coordinator and device count, logs are gathered, a hang or a failed
peer ends in a bounded time with an error naming the process."""

import signal
import sys
import time

import pytest

from unclip_jax.commands import launcher as launch
from unclip_jax.core import sharding

SHOW_ENV = ("import os; print('id', os.environ['JAX_PROCESS_ID'], 'of', "
            "os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_COORDINATOR_ADDRESS'], "
            "os.environ['XLA_FLAGS'], os.environ['JAX_PLATFORMS'])")


def test_each_process_gets_its_environment_and_log(tmp_path):
    results = launch.launch(["python", "-c", SHOW_ENV], processes=3, devices=2, timeout=60,
                            log_dir=tmp_path)
    address = results[0].log.split()[4]
    assert address.startswith("127.0.0.1:")
    for r in results:
        assert r.ok and r.returncode == 0
        assert r.log.split()[:4] == ["id", str(r.index), "of", "3"]
        assert "--xla_force_host_platform_device_count=2" in r.log and r.log.split()[4] == address
        assert (tmp_path / f"process_{r.index}.log").read_text() == r.log


def test_device_count_flag_is_replaced_not_duplicated():
    flags = launch.with_device_count("--foo=1 --xla_force_host_platform_device_count=8", 2)
    assert flags == "--foo=1 --xla_force_host_platform_device_count=2"


def test_one_process_runs_without_a_coordinator():
    env = launch.process_env(0, 1, 4, "127.0.0.1:1")
    assert "JAX_COORDINATOR_ADDRESS" not in env and "JAX_PROCESS_ID" not in env


def test_a_hang_is_killed_after_the_timeout_naming_the_stuck_process(tmp_path):
    code = ("import os, sys, time; print('started', flush=True); "
            "time.sleep(0 if os.environ['JAX_PROCESS_ID'] == '0' else 120)")
    t0 = time.monotonic()
    with pytest.raises(launch.LaunchError) as err:
        launch.launch(["python", "-c", code], processes=2, devices=1, timeout=3,
                      log_dir=tmp_path)
    assert time.monotonic() - t0 < 30
    message = str(err.value)
    assert "process(es) 1 of 2 still running after the 3 s limit" in message
    assert "process 1 (pid" in message and "still running (killed by the launcher)" in message
    assert "started" in message                      # the log's last lines are shown
    r0, r1 = err.value.results
    assert r0.ok and r1.stuck


def test_a_failed_process_gets_its_peers_killed_after_the_grace(tmp_path):
    code = ("import os, sys, time; "
            "sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(120)")
    t0 = time.monotonic()
    with pytest.raises(launch.LaunchError) as err:
        launch.launch(["python", "-c", code], processes=2, devices=1, timeout=600, grace=2,
                      log_dir=tmp_path)
    assert time.monotonic() - t0 < 30
    message = str(err.value)
    assert "did not stop within 2 s after it" in message
    assert "process 1 (pid" in message and "exit code 3" in message
    r0, r1 = err.value.results
    assert r0.stuck and r1.returncode == 3


def test_kill_sends_the_signal_to_one_process(tmp_path):
    cluster = launch.LocalCluster(["python", "-c", "import time; time.sleep(120)"],
                                  processes=2, devices=1, timeout=60, grace=1,
                                  log_dir=tmp_path)
    with cluster:
        time.sleep(0.5)
        cluster.kill(0)
        results = cluster.wait(check=False)
    assert results[0].returncode == -signal.SIGKILL
    assert results[0].state() == "killed by signal SIGKILL"


def test_command_resolution_and_empty_command():
    assert launch.resolve_command(["unclip-jax", "train"])[:3] == [sys.executable, "-m",
                                                                   "unclip_jax.commands.cli"]
    assert launch.resolve_command(["python", "x.py"]) == [sys.executable, "x.py"]
    with pytest.raises(ValueError, match="no command to launch"):
        launch.resolve_command([])


def test_one_process_helpers_are_no_ops():
    """With one process the multi-process helpers change nothing (and need no peers)."""
    import numpy as np

    sharding.check_processes_agree({"a": "x"})
    sharding.barrier("nothing")
    rows = {"x": np.arange(3), "s": np.array(["a", "bb", "c"])}
    out = sharding.gather_process_rows(rows)
    assert out is rows
    assert sharding.fetch({"y": np.ones(2)})["y"].tolist() == [1.0, 1.0]
    assert "process" in sharding.describe_backend()


def test_distributed_timeouts_are_checked(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv(sharding.INIT_TIMEOUT_ENV, "soon")
    monkeypatch.setattr(sharding.jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="UNCLIP_JAX_INIT_TIMEOUT='soon'; accepted: a positive"):
        sharding.maybe_initialize_distributed()
    with pytest.raises(ValueError, match="accepted: HOST:PORT"):
        sharding.wait_for_coordinator("nohostport", 1)
    with pytest.raises(ConnectionError, match="cannot reach the JAX coordinator at "
                                              "127.0.0.1:1 .* after 1 s"):
        sharding.wait_for_coordinator("127.0.0.1:1", 1)
