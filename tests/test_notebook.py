"""experiments/notebooks/quickstart.ipynb runs headless (nbclient) against tiny random-init
checkpoints written to disk in the layout of `make demo` and shows its images."""

from pathlib import Path

import pytest

from tiny import write_tiny_unclip

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parents[1] / "experiments" / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, shapes_tokenizer):
    return write_tiny_unclip(tmp_path_factory.mktemp("tiny_demo"), shapes_tokenizer.path)


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
