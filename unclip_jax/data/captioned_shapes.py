"""TFDS builder for the procedurally rendered captioned-shapes dataset (`unclip_jax.core.shapes`).

Build from the command line (any resolution and sizes; predefined configs r32, r64, r128, r256):

    unclip-jax data shapes --resolution 64 --data-dir /path/to/tfds_data

(`tfds build data/captioned_shapes --config r64` works too where TensorFlow is installed: the
`tfds` command imports it at start-up, the builder does not), or from Python:

    from unclip_jax.data.captioned_shapes import build_captioned_shapes, dataset_name
    data_dir = build_captioned_shapes("/path/to/tfds_data", resolution=32, num_train=16)
    source = tfds.data_source(dataset_name(32, num_train=16), data_dir=data_dir, split="train")

Reading back needs no import of this module: once the files exist, `tfds.data_source` /
`tfds.builder` load any config of `captioned_shapes` from `data_dir` (predefined configs via
this class once it is imported and registered, custom configs from the files' metadata).
Importing this module registers the name `captioned_shapes`; import it only under one module
name per process (tfds refuses a second registration of the same name).

Each record is a dict (as returned by `tfds.data_source`):
  image        uint8 [R, R, 3] (stored as PNG)
  caption      bytes, e.g. b"a small red circle to the left of a big blue square"
  colour       int32 [2], index into shapes.COLOURS, -1 for an absent second object
  shape        int32 [2], index into shapes.SHAPES, -1 absent
  size         int32 [2], index into shapes.SIZES, -1 absent
  position     float32 [2, 2], (x, y) bounding-box centre per object in [0, 1], -1 absent
  num_objects  int32, 1 or 2
  relation     int32, index into shapes.RELATIONS (objects[0] relative to objects[1]), -1 none
  index        int64, the scene index: shapes.sample_scene(seed, index, split) re-creates it
Splits "train", "validation" (in distribution) and "test" (every scene holds a pair from
shapes.HELD_OUT_PAIRS).
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from unclip_jax.core import shapes

_VERSION = tfds.core.Version("1.0.0")
_DEFAULT_SIZES = {"num_train": 20_000, "num_validation": 2_000, "num_test": 2_000}


@dataclasses.dataclass(eq=False)
class CaptionedShapesConfig(tfds.core.BuilderConfig):
    """resolution: image side in pixels; num_*: examples per split; seed: scene seed;
    p_two: probability that a scene has two objects."""
    resolution: int = 64
    num_train: int = _DEFAULT_SIZES["num_train"]
    num_validation: int = _DEFAULT_SIZES["num_validation"]
    num_test: int = _DEFAULT_SIZES["num_test"]
    seed: int = 0
    p_two: float = 0.5


def config_name(resolution: int, num_train: int = _DEFAULT_SIZES["num_train"],
                num_validation: int = _DEFAULT_SIZES["num_validation"],
                num_test: int = _DEFAULT_SIZES["num_test"], seed: int = 0,
                p_two: float = 0.5) -> str:
    """The config name for these settings: "r64" for the predefined defaults, otherwise e.g.
    "r32_n16-8-8_s0_p0.5" (fully determined by the settings, so builds are found again)."""
    if (num_train, num_validation, num_test, seed, p_two) == (
            *_DEFAULT_SIZES.values(), 0, 0.5):
        return f"r{resolution}"
    return f"r{resolution}_n{num_train}-{num_validation}-{num_test}_s{seed}_p{p_two:g}"


def dataset_name(resolution: int, **kwargs) -> str:
    """"captioned_shapes/<config_name(...)>", the name for `tfds.data_source`."""
    return f"{CaptionedShapes.name}/{config_name(resolution, **kwargs)}"


def _make_config(resolution: int, **kwargs) -> CaptionedShapesConfig:
    name = config_name(resolution, **kwargs)
    return CaptionedShapesConfig(
        name=name, version=_VERSION, resolution=resolution,
        description=f"{resolution}x{resolution} images; {name}", **kwargs)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes with captions, rendered procedurally (see `unclip_jax.core.shapes`)."""

    VERSION = _VERSION
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [_make_config(r) for r in (32, 64, 128, 256)]
    DEFAULT_CONFIG_NAME = "r64"

    # tfds 4.9 derives `code_path` through `importlib_resources`, which it does not install on
    # Python >= 3.9; the builder's own file is the same answer without that package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        int2 = dict(shape=(2,), dtype=np.int32)
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "colour": tfds.features.Tensor(**int2),
            "shape": tfds.features.Tensor(**int2),
            "size": tfds.features.Tensor(**int2),
            "position": tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
            "relation": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
        })
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Procedurally rendered coloured shapes (one or two objects) with captions; "
                f"colours {shapes.COLOURS}, shapes {shapes.SHAPES}, sizes {shapes.SIZES}, "
                f"relations {shapes.RELATIONS}; held-out (colour, shape) pairs in the test split: "
                f"{sorted(shapes.HELD_OUT_PAIRS)}."),
            features=features,
            supervised_keys=("image", "caption"),
            disable_shuffling=True,   # records in index order: record i is scene i
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        counts = {"train": cfg.num_train, "validation": cfg.num_validation,
                  "test": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in counts.items()}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        for index in range(num):
            scene = shapes.sample_scene(cfg.seed, index, split, p_two=cfg.p_two)
            example = shapes.scene_to_arrays(scene)
            example["image"] = _png(shapes.render(scene, cfg.resolution))
            example["caption"] = shapes.caption(scene)
            example["index"] = np.int64(index)
            yield index, example


def build_captioned_shapes(data_dir: str | os.PathLike, resolution: int = 64,
                           num_train: int = _DEFAULT_SIZES["num_train"],
                           num_validation: int = _DEFAULT_SIZES["num_validation"],
                           num_test: int = _DEFAULT_SIZES["num_test"], seed: int = 0,
                           p_two: float = 0.5) -> str:
    """Builds the dataset into `data_dir` (skipped if already built) and returns `data_dir`.
    Read it with `tfds.data_source(dataset_name(resolution, ...same settings...),
    data_dir=data_dir, split=...)`."""
    if not 16 <= resolution <= 2048:
        raise ValueError(f"resolution must be in [16, 2048], got {resolution}")
    for key, n in (("num_train", num_train), ("num_validation", num_validation),
                   ("num_test", num_test)):
        if n < 1:
            raise ValueError(f"{key} must be >= 1, got {n}")
    config = _make_config(resolution, num_train=num_train, num_validation=num_validation,
                          num_test=num_test, seed=seed, p_two=p_two)
    if config.name in CaptionedShapes.builder_configs:
        config = config.name   # tfds accepts predefined configs only by name
    builder = CaptionedShapes(config=config, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()   # a no-op when the files are already there
    return os.fspath(data_dir)
