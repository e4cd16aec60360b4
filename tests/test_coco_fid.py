"""``unclip-jax coco-fid`` end to end on a tiny COCO-layout folder written here (shapes renders
as JPEG/PNG images of mixed sizes and modes, a captions json), random FID Inception weights and
a tiny random-init unCLIP chain: a run stopped after one chunk and resumed equals an
uninterrupted one, 2 devices equal 1, real-vs-real FID is 0, the official-zip layout reads as
the extracted one, and each bad input fails with its message."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import write_tiny_unclip

from unclip_jax.commands import cli

from unclip_jax.core import shapes
from unclip_jax.train.eval import coco
from unclip_jax.pipelines.convert import inception as CI
from unclip_jax.train.eval import inception as I

NUM_IMAGES = 12
SIZE = 75                       # the smallest Inception input (299 is FID's; slow on CPU)


def _write_coco(root: Path, num_images: int = NUM_IMAGES) -> Path:
    """``root/annotations/captions_val2014.json`` + ``root/val2014/*.jpg``: two captions per
    image, the shapes caption with the lower annotation id (ids deliberately out of order)."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for i in range(num_images):
        image_id = 1000 + 7 * i
        name = f"COCO_val2014_{image_id:012d}.jpg"
        scene = shapes.sample_scene(3, i)
        img = Image.fromarray(shapes.render(scene, 48)).resize((48 + 8 * (i % 3), 40))
        if i % 4 == 1:
            img = img.convert("L")                       # a grey image
        fmt = "PNG" if i % 3 == 2 else "JPEG"            # COCO names, either content
        img.save(root / "val2014" / name, format=fmt)
        images.append({"id": image_id, "file_name": name, "height": 40, "width": img.width})
        annotations.append({"id": 50_000 - i, "image_id": image_id,
                            "caption": "a picture of some shapes"})
        annotations.append({"id": 10 + i, "image_id": image_id,
                            "caption": "  " + shapes.caption(scene) + "\n"})
    rng.shuffle(annotations)
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(
        {"info": {}, "images": images, "annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_fid")
    _write_coco(root / "coco")
    write_tiny_unclip(root / "chain")
    np.savez(root / "inception.npz", **random_inception())
    return root


def random_inception(seed: int = 0) -> dict[str, np.ndarray]:
    """A pytorch-fid-style state dict of random weights: He-scaled convs and identity
    BatchNorms, so features keep an O(1) scale through the 94 layers (flax's default init
    shrinks them to ~1e-4, which would make every FID tiny). Built in numpy: no init compile."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in I.expected_shapes().items():
        if len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            fill = 1.0 if key.endswith(("bn.weight", "running_var")) else 0.0
            out[key] = np.full(shape, fill, np.float32)
    return out


def _args(setup, out, *extra):
    c = setup / "chain"
    return ["coco-fid", "--coco", str(setup / "coco"), "--inception",
            str(setup / "inception.npz"), "--clip", str(c / "clip"), "--prior", str(c / "prior"),
            "--decoder", str(c / "decoder"), "--upsampler", str(c / "upsampler"),
            "--num", "6", "--chunk-size", "4", "--batch-size", "4", "--resolution", "32",
            "--inception-size", str(SIZE), "--devices", "1", "--out", str(out), *extra]


def _results(out):
    return json.loads((Path(out) / coco.RESULTS).read_text())


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup / "full"
    assert cli.main(_args(setup, out)) == 0
    return out


def test_selection_first_caption_per_image_seeded(setup):
    folder = coco.CocoFolder(setup / "coco")
    assert len(folder.captions) == NUM_IMAGES
    assert all(c.caption == shapes.caption(shapes.sample_scene(3, (c.image_id - 1000) // 7))
               for c in folder.captions)                 # the lower annotation id, stripped
    a = coco.select_captions(folder, 6, subset_seed=0)
    assert a == coco.select_captions(folder, 6, subset_seed=0)
    assert len({c.image_id for c in a}) == 6
    assert a != coco.select_captions(folder, 6, subset_seed=1)


def test_end_to_end_and_resume_equals_uninterrupted(setup, full_run, capsys):
    res = _results(full_run)
    assert res["num_samples"] == 6 and res["fid"] > 0 and 0 <= res["clip_score"] <= 100
    assert sorted(p.name for p in full_run.glob("chunk_*.npz")) == ["chunk_00000.npz",
                                                                      "chunk_00001.npz"]
    with np.load(full_run / "chunk_00001.npz") as z:                # the last chunk: 2 of 4
        assert z["fake"].shape == z["real"].shape == (2, I.FEATURE_DIM)

    cut = setup / "cut"
    assert cli.main(_args(setup, cut, "--max-chunks", "1")) == 0
    assert '"chunks_done": 1' in capsys.readouterr().out
    assert not (cut / coco.RESULTS).exists() and (cut / "chunk_00000.npz").is_file()
    assert cli.main(_args(setup, cut)) == 0                         # resumed
    assert "1 of 2 chunks already" in capsys.readouterr().out
    again = _results(cut)
    assert again["fid"] == res["fid"] and again["clip_score"] == res["clip_score"]
    for k in range(2):
        with np.load(full_run / f"chunk_{k:05d}.npz") as a, \
                np.load(cut / f"chunk_{k:05d}.npz") as b:
            for name in a.files:
                np.testing.assert_array_equal(a[name], b[name])


def test_two_devices_equal_one(setup, full_run):
    out = setup / "two"
    args = _args(setup, out)
    args[args.index("--devices") + 1] = "2"
    assert cli.main(args) == 0
    one, two = _results(full_run), _results(out)
    assert one["settings"] == two["settings"]           # the device count is not a setting
    with np.load(full_run / "chunk_00000.npz") as a, np.load(out / "chunk_00000.npz") as b:
        np.testing.assert_allclose(a["real"], b["real"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a["clip_score"], b["clip_score"], atol=0.5)
    # samples may differ by one grey level in a few pixels (float rounding of the split batch)
    assert two["fid"] == pytest.approx(one["fid"], rel=0.02)


def test_real_vs_real_fid_is_zero_and_zips_read_as_folder(setup, tmp_path):
    """The official zips (annotations_trainval2014.zip + val2014.zip) give the same captions
    and images; a 'sampler' returning the real images scores FID 0."""
    src = setup / "coco"
    zips = tmp_path / "zips"
    zips.mkdir()
    with zipfile.ZipFile(zips / "annotations_trainval2014.zip", "w") as z:
        z.write(src / "annotations/captions_val2014.json", "annotations/captions_val2014.json")
    with zipfile.ZipFile(zips / "val2014.zip", "w") as z:
        for p in sorted((src / "val2014").iterdir()):
            z.write(p, f"val2014/{p.name}")
    folder, zipped = coco.CocoFolder(src), coco.CocoFolder(zips)
    assert zipped.captions == folder.captions
    chosen = coco.select_captions(zipped, 8)
    np.testing.assert_array_equal(coco.load_real(zipped, chosen, 32),
                                  coco.load_real(folder, chosen, 32))

    feats = I.InceptionFeatures(CI.load_variables(setup / "inception.npz"), 4, SIZE)
    real = lambda items, k: coco.load_real(folder, items, 32)  # noqa: E731
    res = coco.run(zipped, chosen, tmp_path / "out", sample=real, inception=feats,
                   settings={"test": 1}, chunk_size=4, resolution=32)
    trace = np.trace(coco.metrics.FeatureStats.load(tmp_path / "out/real_stats.npz").cov)
    assert res["complete"] and res["clip_score"] is None
    assert abs(res["fid"]) <= 1e-9 * trace
    # other images of the same kind: clearly not 0
    others = lambda items, k: coco.load_real(folder, coco.select_captions(  # noqa: E731
        folder, 12)[::-1][k * 4:k * 4 + 4], 32)
    res = coco.run(zipped, chosen, tmp_path / "out2", sample=others, inception=feats,
                   settings={"test": 2}, chunk_size=4, resolution=32)
    assert res["fid"] > 1e-3 * trace


def _fails(args, capsys, *needles):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_bad_input_errors(setup, full_run, tmp_path, capsys):
    args = _args(setup, tmp_path / "out")
    i_coco = args.index("--coco") + 1

    bad = list(args)                                             # no annotations
    empty = tmp_path / "empty"
    (empty / "val2014").mkdir(parents=True)
    bad[i_coco] = str(empty)
    _fails(bad, capsys, "no val2014 caption annotations", "annotations/captions_val2014.json",
           "annotations_trainval2014.zip")

    partial = _write_coco(tmp_path / "partial")                 # images missing
    for p in sorted((partial / "val2014").iterdir())[:3]:
        p.unlink()
    bad[i_coco] = str(partial)
    bad[bad.index("--num") + 1] = "12"
    _fails(bad, capsys, "names 3 of the 12 chosen images that are not in",
           "COCO_val2014_000000001000.jpg")

    bad = list(args)                                             # N too large
    bad[bad.index("--num") + 1] = "13"
    _fails(bad, capsys, "num = 13 captions asked for", "has 12 captioned images",
           "accepted: 1 to 12")

    bad = list(args)                                             # no Inception weights
    bad[bad.index("--inception") + 1] = str(tmp_path / "pt_inception.pth")
    _fails(bad, capsys, "no weights file at", "pt_inception-2015-12-05")

    bad = _args(setup, full_run, "--seed", "1")                   # other settings
    _fails(bad, capsys, "holds chunks of a coco-fid run with other settings", "sampling:",
           '"seed": 0', '"seed": 1')
    bad = _args(setup, full_run, "--num", "5")
    _fails(bad, capsys, "num: 6 there, 5 now")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "chunk_00000.npz").write_bytes(b"")
    _fails(_args(setup, stray), capsys, "holds chunk files but no manifest.json")

    bad = _args(setup, tmp_path / "o3")                          # chunks that do not split
    bad[bad.index("--devices") + 1] = "8"
    _fails(bad, capsys, "--chunk-size 4 does not split over the 8 devices")
