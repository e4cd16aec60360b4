"""``sharding.split_cpu_cores``: one XLA CPU device per core for data-parallel CPU runs (the
demo), before JAX initialises; each case runs in a fresh interpreter."""

import os
import subprocess
import sys

import pytest

from unclip_jax.core import sharding

SCRIPT = ("import jax; from unclip_jax.core import sharding; n = sharding.split_cpu_cores(); "
          "print(n, len(jax.devices('cpu')))")


def _run(env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", sharding.CPU_DEVICES_ENV)}
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**base, **env},
                          capture_output=True, text=True, timeout=120)


def test_split_cpu_cores_sets_the_device_count():
    out = _run({sharding.CPU_DEVICES_ENV: "4", "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == ["4", "4"], out.stderr
    one = _run({sharding.CPU_DEVICES_ENV: "1", "JAX_PLATFORMS": "cpu"})
    assert one.stdout.split() == ["0", "1"], one.stderr


def test_split_cpu_cores_leaves_an_explicit_xla_flag_alone():
    out = _run({"XLA_FLAGS": "--xla_force_host_platform_device_count=3",
                sharding.CPU_DEVICES_ENV: "4", "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == ["0", "3"], out.stderr


def test_split_cpu_cores_bad_value_and_after_initialisation(monkeypatch):
    bad = _run({sharding.CPU_DEVICES_ENV: "two"})
    assert bad.returncode != 0
    assert "UNCLIP_JAX_CPU_DEVICES='two'; accepted: a positive number" in bad.stderr
    import jax

    jax.devices()                     # this process's backends exist: nothing can change
    monkeypatch.setenv(sharding.CPU_DEVICES_ENV, "4")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert sharding.split_cpu_cores() == 0
    with pytest.raises(ValueError, match="accepted: a positive number"):
        monkeypatch.setenv(sharding.CPU_DEVICES_ENV, "0")
        sharding.split_cpu_cores()
