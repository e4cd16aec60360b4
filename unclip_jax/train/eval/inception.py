"""The FID Inception-v3 (pool3, 2048-d) in flax linen, with a loader for user-supplied weights.

True FID uses the features of one particular network: the TF-slim Inception-v3 graph of
2015-12-05 that TF-FID ships, re-exported for PyTorch by pytorch-fid as
``pt_inception-2015-12-05-6726825d.pth``. That network is torchvision's Inception-v3 with
three differences this module reproduces: the average pools inside the A, C and first E
blocks exclude the padding from the mean (``count_include_pad=False``), the last E block
pools with a max instead of an average, and the classifier has 1008 classes (unused here:
features are taken after the global average pool, before ``fc``).

No weights are downloaded or shipped. :func:`unclip_jax.pipelines.convert.inception.load_variables`
reads a state dict with the pytorch-fid key names (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_mean``, …) from a ``.pth`` (only when torch is installed;
read with ``weights_only=True``), an ``.npz`` or a ``.safetensors`` file, and checks it
all-or-nothing: every missing key, unexpected key and wrong shape is listed in one error.
``fc.*`` and BatchNorm's ``num_batches_tracked`` are accepted and ignored.

Preprocessing follows pytorch-fid: bilinear resize to 299×299 without antialiasing
(``align_corners=False``), inputs in [-1, 1]. TF-FID resizes differently, so FIDs from the two
differ slightly; compare numbers only within one implementation.

Usage::

    from unclip_jax.pipelines.convert.inception import load_variables  # the weights file
    feats = InceptionFeatures(load_variables("pt_inception-2015-12-05-6726825d.pth"))
    stats = metrics.feature_stats(feats, batches_of_uint8_images)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3


class BasicConv(nn.Module):
    """Conv (no bias) → BatchNorm (running statistics, ε = 1e-3) → ReLU."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, (self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg3(x):
    """3×3 stride-1 average pool, padding 1, padding excluded from the mean (FID variant)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class BlockA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(48, name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class BlockC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c, name="branch7x7_1")(x)
        b7 = BasicConv(c, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv(c, name="branch7x7dbl_1")(x)
        bd = BasicConv(c, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv(c, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv(c, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class BlockE(nn.Module):
    pool: str            # "avg" (Mixed_7b, padding excluded) or "max" (Mixed_7c)

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, **row, name="branch3x3_2a")(b3),
                              BasicConv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
                              BasicConv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = (_avg3(x) if self.pool == "avg"
                  else nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))))
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """``[B, H, W, 3]`` in [-1, 1] (already at the working size) → ``[B, 2048]`` pool3."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max3s2(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max3s2(x)
        x = BlockA(32, name="Mixed_5b")(x)
        x = BlockA(64, name="Mixed_5c")(x)
        x = BlockA(64, name="Mixed_5d")(x)
        x = BlockB(name="Mixed_6a")(x)
        x = BlockC(128, name="Mixed_6b")(x)
        x = BlockC(160, name="Mixed_6c")(x)
        x = BlockC(160, name="Mixed_6d")(x)
        x = BlockC(192, name="Mixed_6e")(x)
        x = BlockD(name="Mixed_7a")(x)
        x = BlockE("avg", name="Mixed_7b")(x)
        x = BlockE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ============================================================================ weights


def init_variables(seed: int = 0, size: int = INPUT_SIZE) -> dict:
    """Random ``{"params", "batch_stats"}`` (flax default init; for tests and shape checks)."""
    return FIDInceptionV3().init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))


def _flax_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
    *mods, leaf = path
    name = {("params", "kernel"): "weight", ("params", "scale"): "weight",
            ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
            ("batch_stats", "var"): "running_var"}[(collection, leaf)]
    return ".".join([*mods, name])


@functools.lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """``{torch key: torch shape}`` of every tensor the network needs (conv weights
    ``[O, I, kh, kw]``, BatchNorm vectors ``[C]``)."""
    abstract = jax.eval_shape(lambda: init_variables(0, 75))
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract[collection])[0]:
            keys = tuple(k.key for k in path)
            shape = tuple(leaf.shape)
            if len(shape) == 4:                      # flax HWIO → torch OIHW
                shape = (shape[3], shape[2], shape[0], shape[1])
            out[_flax_to_torch_key(collection, keys)] = shape
    return out


def _ignored(key: str) -> bool:
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def check_state_dict(state_dict: dict[str, Any]) -> None:
    """Raise ValueError listing every missing, unexpected and wrongly shaped key."""
    want = expected_shapes()
    have = {k: tuple(np.shape(v)) for k, v in state_dict.items() if not _ignored(k)}
    problems = [f"  missing: {k} (want {want[k]})" for k in sorted(set(want) - set(have))]
    problems += [f"  unexpected: {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"  wrong shape: {k} is {have[k]}, want {want[k]}"
                 for k in sorted(set(want) & set(have)) if have[k] != want[k]]
    if problems:
        shown = problems[:30] + ([f"  ... and {len(problems) - 30} more"]
                                 if len(problems) > 30 else [])
        raise ValueError(f"the state dict does not fit the FID Inception-v3 ({len(problems)} "
                         f"bad keys; expected the {len(want)} keys of pytorch-fid's "
                         f"FIDInceptionA/C/E network, fc.* optional):\n" + "\n".join(shown))


def variables_from_state_dict(state_dict: dict[str, Any]) -> dict:
    """Flax ``{"params", "batch_stats"}`` from a pytorch-fid-style state dict (checked first)."""
    check_state_dict(state_dict)
    out: dict = {"params": {}, "batch_stats": {}}
    leaf_of = {"weight": None, "bias": "bias", "running_mean": "mean", "running_var": "var"}
    for key in expected_shapes():
        *mods, name = key.split(".")
        v = np.asarray(state_dict[key], np.float32)
        if name == "weight":
            if v.ndim == 4:
                collection, leaf, v = "params", "kernel", v.transpose(2, 3, 1, 0)
            else:
                collection, leaf = "params", "scale"
        else:
            leaf = leaf_of[name]
            collection = "params" if name == "bias" else "batch_stats"
        node = out[collection]
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = jnp.asarray(v)
    return out


def state_dict_from_variables(variables: dict) -> dict[str, np.ndarray]:
    """The inverse of :func:`variables_from_state_dict` (torch layouts, numpy arrays)."""
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            v = np.asarray(leaf)
            if v.ndim == 4:
                v = v.transpose(3, 2, 0, 1)
            out[_flax_to_torch_key(collection, tuple(k.key for k in path))] = v
    return out


# ============================================================================ extractor


@functools.lru_cache(maxsize=4)
def features_fn(size: int):
    model = FIDInceptionV3()

    def fn(variables, x):
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), method="linear",
                                 antialias=False)
        return model.apply(variables, x)

    return jax.jit(fn)


class InceptionFeatures:
    """``images → [N, 2048]`` pool3 features, batched under one ``jax.jit``; a drop-in
    extractor for :func:`unclip_jax.train.eval.metrics.feature_stats`.

    ``size``: the working resolution (299 for FID; smaller sizes ≥ 75 only for tests).
    ``mesh`` (:func:`unclip_jax.core.sharding.rows_mesh`): every batch split over its devices, the
    weights copied to each once (``batch_size`` must divide by the device count)."""

    def __init__(self, variables: dict, batch_size: int = 32, size: int = INPUT_SIZE,
                 mesh=None):
        if size < 75:
            raise ValueError(f"Inception-v3 needs inputs of at least 75×75, got size={size}")
        if mesh is not None:
            from unclip_jax.core import sharding

            variables = sharding.put_replicated(variables, mesh)
        self.variables, self.batch_size, self.size, self.mesh = variables, batch_size, size, mesh
        self.fn = features_fn(size)

    dim = FEATURE_DIM

    def images(self, images) -> np.ndarray:
        """uint8 or [-1, 1] float ``[N, H, W, 3]`` → ``[N, 2048]`` float32."""
        from unclip_jax.train.eval.metrics import batched_apply, to_model_range

        return batched_apply(functools.partial(self.fn, self.variables),
                             to_model_range(images), self.batch_size, self.mesh)

    __call__ = images


__all__ = ["FEATURE_DIM", "FIDInceptionV3", "InceptionFeatures", "check_state_dict",
           "expected_shapes", "init_variables",
           "state_dict_from_variables", "variables_from_state_dict"]
