"""The command line: errors are clear and exit 2; a tiny CLIP trains and resumes to the bit."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from unclip_jax.commands import cli
from unclip_jax.train.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
CLIP_CFG = str(REPO / "experiments/shapes/clip.py")


def tiny_overrides(data_dir, steps):
    from unclip_jax.data.captioned_shapes import dataset_name

    return ["--set", f"data.data_dir={data_dir}", "--set",
            f"data.name={dataset_name(32, **SIZES)}", "--set", "train.ema_decay=0.9",
            "--set", f"train.steps={steps}", "--set", "train.batch_size=16",
            "--set", "train.log_every=2", "--set", "train.ckpt_every=3",
            "--set", "train.eval_every=0", "--set", "train.eval_at_end=false",
            "--set", "train.async_checkpoint=true",
            "--set", "model.vision_layers=1", "--set", "model.text_layers=1",
            "--set", "model.vision_width=32", "--set", "model.text_width=32",
            "--set", "model.embed_dim=16", "--set", "data.vocab_size=64"]


def test_unknown_key_exits_2_naming_valid_keys(tmp_path, capsys):
    code = cli.main(["train", CLIP_CFG, "--workdir", str(tmp_path), "--set", "train.stpes=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown config key 'train.stpes'" in err and "batch_size" in err and "steps" in err


def test_wrong_type_exits_2(tmp_path, capsys):
    code = cli.main(["train", CLIP_CFG, "--workdir", str(tmp_path), "--set",
                     "train.batch_size=big"])
    assert code == 2
    assert "'train.batch_size' expects an int, got 'big'" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


SIZES = dict(num_train=256, num_validation=32, num_test=32)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """A small 32 px captioned_shapes build in a temp data dir."""
    from unclip_jax.data.captioned_shapes import build_captioned_shapes

    return build_captioned_shapes(tmp_path_factory.mktemp("data"), resolution=32, **SIZES)


@pytest.mark.slow
def test_cli_train_kill_and_resume_is_bitwise_identical(tiny_shapes, tmp_path):
    """Interrupted after step 7 (latest checkpoint 6), resumed: same params, EMA, optimizer
    state and data position as the uninterrupted 9-step run."""
    from unclip_jax.core import config as config_lib
    from unclip_jax.train import loop, tasks

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    assert cli.main(["train", CLIP_CFG, "--workdir", str(full_dir),
                     *tiny_overrides(tiny_shapes, 9)]) == 0
    # The interrupted run: same command, stopped after step 7 as a crash would.
    sets = tiny_overrides(tiny_shapes, 9)[1::2]
    cfg = config_lib.load_config(CLIP_CFG, sets)
    cfg, task = tasks.build_task(cfg, cut_dir)
    loop.train(cfg, task, cut_dir, stop_after=7, progress=False)
    assert Checkpointer(cut_dir).latest_step() == 6
    assert cli.main(["train", CLIP_CFG, "--workdir", str(cut_dir),
                     *tiny_overrides(tiny_shapes, 9)]) == 0

    a, b = Checkpointer(full_dir), Checkpointer(cut_dir)
    assert a.latest_step() == b.latest_step() == 9
    for which in ("params", "ema_params", "opt_state"):
        for x, y in zip(jax.tree.leaves(a.restore_params(9, which)),
                        jax.tree.leaves(b.restore_params(9, which)), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    data_a = json.loads((full_dir / "checkpoints/9/data/metadata").read_text())
    data_b = json.loads((cut_dir / "checkpoints/9/data/metadata").read_text())
    assert data_a == data_b == {"position": 9}


@pytest.mark.slow
def test_cli_refuses_checkpoint_of_other_model(tiny_shapes, tmp_path, capsys):
    args = ["train", CLIP_CFG, "--workdir", str(tmp_path), *tiny_overrides(tiny_shapes, 2)]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main([*args, "--set", "model.text_width=48", "--set", "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert "does not match this model/config" in err
    assert "checkpoint shape (32,), config shape (48,)" in err
