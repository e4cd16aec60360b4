"""`make install` picks the JAX build of the machine: the detection script on faked machines,
and the Makefile's install commands for each choice (dry run, nothing installed)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DETECT = REPO / "scripts" / "detect_accelerator.sh"


def detect(tmp_path, env_extra=None, driver=None) -> str:
    """The script's answer with ``nvidia-smi`` faked (answering ``driver``) or absent."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("sh", "ls", "grep", "head", "cat"):
        found = shutil.which(name)
        if found and not (bin_dir / name).exists():
            (bin_dir / name).symlink_to(found)
    fake = bin_dir / "nvidia-smi"
    if driver is not None:
        fake.write_text(f"#!/bin/sh\necho '{driver}'\n")
        fake.chmod(0o755)
    elif fake.exists():
        fake.unlink()
    env = {"PATH": str(bin_dir), **(env_extra or {})}
    return subprocess.run(["sh", str(DETECT)], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def this_machine_has_an_accelerator() -> bool:
    return bool(shutil.which("nvidia-smi")) or any(Path("/dev").glob("accel*")) or bool(
        os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_NAME"))


def test_detection(tmp_path):
    assert detect(tmp_path, driver="580.65.06") == "cuda13"
    assert detect(tmp_path, driver="550.54.15") == "cuda12"
    assert detect(tmp_path, driver="") in ("cpu", "tpu")        # nvidia-smi without a GPU
    assert detect(tmp_path, env_extra={"TPU_ACCELERATOR_TYPE": "v5litepod-8"}) == "tpu"
    if not this_machine_has_an_accelerator():
        assert detect(tmp_path) == "cpu"


def make_dry_run(*args) -> subprocess.CompletedProcess:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    # -B: print every command even where the venv is already installed
    return subprocess.run(["make", "-n", "-B", "install", *args], cwd=REPO,
                          capture_output=True, text=True)


@pytest.mark.parametrize("choice", ["cuda12", "cuda13", "tpu"])
def test_make_install_adds_the_chosen_jax_build(choice):
    out = make_dry_run(f"JAX_ACCELERATOR={choice}")
    assert out.returncode == 0, out.stderr
    pip = [line for line in out.stdout.splitlines() if "-r requirements.txt" in line]
    assert len(pip) == 1 and f'"jax[{choice}]>=0.6,<0.13"' in pip[0]
    assert f".installed.{choice}" in out.stdout           # switching builds reinstalls


def test_make_install_on_cpu_is_unchanged():
    out = make_dry_run("JAX_ACCELERATOR=cpu")
    assert out.returncode == 0, out.stderr
    pip = [line for line in out.stdout.splitlines() if "-r requirements.txt" in line]
    assert len(pip) == 1 and "jax[" not in pip[0]
    assert "touch .venv/.installed\n" in out.stdout + "\n"


def test_make_install_rejects_an_unknown_choice():
    out = make_dry_run("JAX_ACCELERATOR=gpu")
    assert out.returncode != 0
    assert "JAX_ACCELERATOR=gpu is not supported; accepted: auto, cpu cuda12 cuda13 tpu" in \
        out.stderr
