"""experiments/notebooks/quickstart.ipynb runs headless (nbclient) against tiny random-init
checkpoints written to disk in the layout of `make demo` and shows its images."""

import json
import shutil
from pathlib import Path

import pytest

from unclip_jax import config as config_lib
from unclip_jax.train.checkpoint import Checkpointer

from tiny import TINY_CLIP as CLIP_CFG
from tiny import TINY_DECODER as DEC_CFG
from tiny import TINY_PRIOR as PRIOR_CFG
from tiny import TINY_UPSAMPLER as UPS_CFG
from tiny import unclip_params

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parents[1] / "experiments" / "notebooks" / "quickstart.ipynb"


def _write_run(workdir: Path, model_cfg, params) -> None:
    """A training run's on-disk layout: config.json and one complete checkpoint (no EMA)."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(
        {"model": config_lib.to_dict(model_cfg), "train": {"ema_decay": 0.0}}))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(1, {"params": params}, {"position": 0}, {})
    ckpt.close()


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, shapes_tokenizer):
    root = tmp_path_factory.mktemp("tiny_demo")
    shutil.copyfile(shapes_tokenizer.path, root / "tokenizer.model")
    params = unclip_params()
    for name, cfg, p in (("clip", CLIP_CFG, params["clip"]), ("prior", PRIOR_CFG, params["prior"]),
                         ("decoder", DEC_CFG, params["decoder"]),
                         ("upsampler", UPS_CFG, params["upsamplers"][0])):
        _write_run(root / name, cfg, p)
    return root


@pytest.mark.slow       # ≈ 130 s on the shared 2-core CPU: a kernel start and ~8 compiles
def test_quickstart_notebook_runs_headless(tiny_demo, monkeypatch):
    monkeypatch.setenv("UNCLIP_DEMO_DIR", str(tiny_demo))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"demo checkpoints: {tiny_demo}" in text
    assert "output resolution 16 px; CLIP embedding 8-d" in text
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o["data"]]
    assert len(pngs) == 4                  # samples, more samples, variations, interpolation
