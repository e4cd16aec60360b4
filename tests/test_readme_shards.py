"""The README tutorial "Train on img2dataset / webdataset shards" runs end to end: its bash block,
parsed from README.md and run in bash with ``D`` pointing at tiny shards written here
(img2dataset's layout: jpg/png/webp images, txt captions, json metadata, a stats file beside),
each ``unclip-jax`` call executed in this process with only size-shrinking ``--set`` overrides
appended; CLIP → embed → prior → decoder leave checkpoints, the embedding cache, the decoder's
sample grids and TensorBoard event files."""

import io
import json
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unclip_jax.commands import cli
from unclip_jax.core import shapes

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Train on img2dataset / webdataset shards"
TRAIN_SHARDS, EVAL_SHARDS, PER_SHARD = range(6), (330, 331), 8

# Only what makes the run tiny (appended after the README's own --set, so these win).
TINY = {
    "experiments/shapes/clip.py": [
        "data.image_size=16", "data.vocab_size=64", "data.shuffle_buffer=8",
        "model.vision_layers=1", "model.text_layers=1", "model.vision_width=16",
        "model.text_width=16", "model.vision_heads=2", "model.text_heads=2",
        "model.embed_dim=8", "train.steps=2", "train.batch_size=8", "train.log_every=1",
        "train.ckpt_every=2", "train.eval_every=0", "train.eval_at_end=false"],
    "experiments/shapes/prior.py": [
        "data.image_size=16", "data.shuffle_buffer=8", "model.width=16", "model.depth=1",
        "model.num_heads=2", "model.sample_steps=2", "train.steps=2", "train.batch_size=8",
        "train.log_every=1", "train.ckpt_every=2"],
    "experiments/shapes/decoder.py": [
        "data.image_size=16", "data.shuffle_buffer=8", "model.base_channels=8",
        "model.channel_mult=1", "model.attention_resolutions=", "model.head_channels=8",
        "model.context_dim=8", "model.text_layers=1", "model.text_width=8",
        "model.text_heads=1", "model.sample_steps=2", "train.steps=2", "train.batch_size=8",
        "train.log_every=1", "train.ckpt_every=2", "train.sample_every=2"],
}


def readme_block() -> str:
    """The first ```bash block after the tutorial's heading."""
    text = README.read_text()
    start = text.index(HEADING)
    m = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert m, f"no bash block after {HEADING!r}"
    return m.group(1)


def _members(s: int, i: int) -> dict[str, bytes]:
    """One img2dataset sample: a shapes render (mixed sizes and modes) as jpg/png/webp, its
    caption, its metadata."""
    key = f"{s:05d}{i:04d}"
    scene = shapes.sample_scene(11, s * PER_SHARD + i)
    img = Image.fromarray(shapes.render(scene, 24)).resize((24 + 4 * (i % 3), 24))
    fmt = ("jpg", "png", "webp")[(s + i) % 3]
    if fmt == "png" and i % 2:
        img = img.convert("RGBA")
    buf = io.BytesIO()
    img.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    cap = shapes.caption(scene)
    meta = {"key": key, "caption": cap, "width": img.width, "height": img.height,
            "status": "success"}
    return {f"{key}.{fmt}": buf.getvalue(), f"{key}.txt": cap.encode(),
            f"{key}.json": json.dumps(meta).encode()}


def write_shards(folder: Path) -> None:
    folder.mkdir(parents=True)
    for s in (*TRAIN_SHARDS, *EVAL_SHARDS):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                for name, data in _members(s, i).items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD}))


def record_calls(block: str, shards: Path, cwd: Path) -> list[list[str]]:
    """Run the README block in bash with ``D`` set to ``shards``; ``unclip-jax`` and
    ``tensorboard`` are shell functions that record their arguments (one JSON list a line)."""
    script, n = re.subn(r"^D=\S+", f"D={shlex.quote(str(shards))}", block, count=1, flags=re.M)
    assert n == 1, "the README block no longer sets D=…"
    calls = cwd / "calls.jsonl"
    record = ('python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> '
              + shlex.quote(str(calls)))
    prelude = (f"set -euo pipefail\nunclip-jax() {{ {record}; }}\n"
               f"tensorboard() {{ set -- tensorboard \"$@\"; {record}; }}\n")
    subprocess.run(["bash", "-c", prelude + script], cwd=cwd, check=True)
    return [json.loads(line) for line in calls.read_text().splitlines()]


@pytest.mark.slow       # three tiny trainings and an embedding pass: minutes on the 2-core CPU
def test_readme_shards_tutorial_runs_end_to_end(tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    write_shards(shards)
    calls = record_calls(readme_block(), shards, tmp_path)
    steps = [c[0] if c[0] != "train" else c[1] for c in calls]
    assert steps == ["experiments/shapes/clip.py", "embed", "experiments/shapes/prior.py",
                     "experiments/shapes/decoder.py", "tensorboard"], steps

    repo = README.parent
    monkeypatch.chdir(tmp_path)
    for call in calls[:-1]:                  # tensorboard is for the reader
        argv = list(call)
        if argv[0] == "train":
            argv[1] = str(repo / argv[1])   # the configs live in the repository
            argv += [a for s in TINY[call[1]] for a in ("--set", s)]
        elif argv[0] == "embed":
            argv += ["--batch-size", "8"]
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)

    runs = tmp_path / "runs" / "cc3m"
    assert (runs / "clip" / "tokenizer.model").is_file()
    for name in ("clip", "prior", "decoder"):
        assert (runs / name / "checkpoints" / "2").is_dir(), name
        assert (runs / name / "metrics.jsonl").is_file(), name
        assert list((runs / name / "tensorboard").glob("events.out.tfevents.*")), name
    assert (runs / "embeddings" / "meta.json").is_file()
    for split in ("train", "validation"):
        assert list((runs / "embeddings" / split).glob("*.npz")), split
    grids = sorted(p.name for p in (runs / "decoder" / "samples").glob("decoder_*.png"))
    assert grids == ["decoder_0000002.png"], grids            # the step, zero-padded
    assert np.asarray(Image.open(runs / "decoder" / "samples" / grids[0])).ndim == 3
    from test_writers import read_events

    images = [(e.step, v.tag) for e in read_events(runs / "decoder" / "tensorboard")
              for v in e.summary.value if v.WhichOneof("value") == "image"]
    assert images == [(2, "decoder")], images                 # the grid in TensorBoard too
    assert calls[-1] == ["tensorboard", "--logdir", "runs/cc3m"]
