"""Device mesh, logical-axis rules and the helpers that turn logical specs into shardings.

Every parameter and major activation carries *logical* axis names (``"batch"``, ``"embed"``,
``"mlp"``, ``"heads"``, ...). One rules table maps them to the mesh axes
``("data", "fsdp", "model")``. Meshes are built with ``AxisType.Auto`` axes: linen's logical
constraints need them (``jax.make_mesh`` defaults to Explicit axes now).

Logical axis names used across the package:

=============  =====================================================  ==============
name           meaning                                                default mesh
=============  =====================================================  ==============
batch          examples                                               (data, fsdp)
embed          model width of a parameter (sharded for FSDP)          fsdp
mlp            MLP hidden features                                    model
heads          attention heads                                        model
kv             per-head features                                      —
vocab          vocabulary / code-book entries                         model
length         sequence positions                                     —
height, width  image rows / columns                                   —
conv_in        conv kernel input channels (sharded for FSDP)          fsdp
conv_out       conv kernel output channels                            model
act_embed      model width of an activation                           —
act_mlp        MLP hidden of an activation                            model
act_heads      heads of an activation                                 model
norm           norm scales/biases, small vectors                      —
=============  =====================================================  ==============
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# One table: logical name -> mesh axis (or tuple of axes, or None = replicated).
_RULES_FSDP_TP: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("conv_out", "model"),
    ("act_mlp", "model"),
    ("act_heads", "model"),
    ("kv", None),
    ("length", None),
    ("height", None),
    ("width", None),
    ("act_embed", None),
    ("norm", None),
    ("layers", None),
)

PRESETS = ("dp", "fsdp", "fsdp_tp")


def logical_rules(preset: str = "fsdp_tp") -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules table for a parallelism preset.

    ``dp``: parameters replicated, batch split over every device. ``fsdp``: parameters and
    optimizer state sharded over ``fsdp``. ``fsdp_tp``: additionally heads / MLP hidden / conv
    output channels over ``model``. Mesh axes of size 1 make any preset degrade gracefully.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown sharding preset {preset!r}; accepted: {', '.join(PRESETS)}")
    keep = {"dp": {"batch"}, "fsdp": {"batch", "embed", "conv_in"}, "fsdp_tp": None}[preset]
    return tuple(
        (name, axes if keep is None or name in keep else None) for name, axes in _RULES_FSDP_TP
    )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``model`` mesh axes; one of them may be -1 (fills)."""

    data: int = -1
    fsdp: int = 1
    model: int = 1
    preset: str = "fsdp_tp"


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the -1 entry of ``cfg`` so the product equals ``num_devices``.

    A fully specified mesh may use fewer devices than are available (the first ones).
    """
    sizes = [cfg.data, cfg.fsdp, cfg.model]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} "
                         f"model={cfg.model}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed "
                             f"axes of product {known} (data={cfg.data} fsdp={cfg.fsdp} "
                             f"model={cfg.model})")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) > num_devices:
        raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} model={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, but {num_devices} are available")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "model")`` mesh with Auto axes over ``devices`` (default: all)."""
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    devices = devices[: int(np.prod(shape))]
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding for a global batch array of rank ``ndim``: leading axis over (data, fsdp)."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the data and fsdp axis sizes."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Fail with a clear message unless ``batch_size`` splits evenly over data×fsdp."""
    div = batch_divisor(mesh)
    if batch_size % div:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the mesh's data×fsdp size "
            f"{div} (data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}); choose a multiple "
            f"of {div}")


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (possibly ``LogicallyPartitioned``-boxed) abstract pytree.

    ``abstract_tree`` comes from ``jax.eval_shape(init, ...)``. Leaves without logical names are
    replicated. Returns a tree of NamedSharding with the boxes removed.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    return jax.tree.map(lambda s, a: divisible_sharding(s, np.shape(a)), shardings,
                        strip_boxes(abstract_tree))


def divisible_sharding(s: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """``s`` with each dimension that its mesh axes do not divide evenly replicated instead.

    E.g. a U-Net's first conv kernel ``[3, 3, 3, C]`` has its input channels (3, RGB) named
    ``conv_in`` → fsdp; with fsdp = 2 that dimension cannot be split, so it is kept whole on
    every device (the kernel is tiny) rather than failing to place the array.
    """
    if not isinstance(s, NamedSharding):
        return s
    spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
    changed = False
    for dim, entry in enumerate(spec[:len(shape)]):
        if entry is None:
            continue
        axes = entry if isinstance(entry, tuple) else (entry,)
        if shape[dim] % int(np.prod([s.mesh.shape[a] for a in axes])):
            spec[dim], changed = None, True
    return NamedSharding(s.mesh, P(*spec[:len(shape)])) if changed else s


def gathered_kernel_conv(compute_names: Sequence[str | None]):
    """A ``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)`` that first
    constrains the kernel to the logical names ``compute_names`` (the kernel's storage names
    with the FSDP-sharded input channels replaced by None): FSDP's all-gather of the weight,
    written out instead of left to the partitioner.

    Why: XLA's SPMD partitioner (jaxlib 0.10.2, CPU; Shardy and GSPMD alike) miscompiles a
    convolution whose batch is split over ("data", "fsdp"), whose input features and kernel
    input channels are split over "model" and whose kernel *output* channels are split over
    "fsdp": it permutes the batch shards to line them up with the kernel's fsdp shards and
    never permutes the result back, so examples come out on the wrong devices. That is the
    transpose (input gradient) of every conv whose kernel is stored [.., fsdp, model], so
    without this the dVAE's gradients on a data × fsdp × model mesh were wrong (repro:
    ``benchmarks/repro_spmd_conv_batch_permute.py``). Outside a mesh / rules context the
    constraint is a no-op.
    """
    names = tuple(compute_names)

    def conv(lhs, rhs, *args, **kwargs):
        return jax.lax.conv_general_dilated(lhs, nn.with_logical_constraint(rhs, names),
                                            *args, **kwargs)

    return conv


def strip_boxes(tree: Any) -> Any:
    """Remove ``LogicallyPartitioned`` boxes without applying constraints (safe outside jit)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                        is_leaf=is_box)


def abstract_with_shardings(boxed_abstract: Any, mesh: Mesh, rules) -> tuple[Any, Any]:
    """``(abstract, shardings)`` for a boxed ``jax.eval_shape`` result.

    ``abstract`` is the unboxed tree of ShapeDtypeStruct carrying their NamedShardings (what
    orbax restores into); ``shardings`` the matching tree of NamedSharding (for ``jax.jit``).
    """
    shardings = logical_shardings(boxed_abstract, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            strip_boxes(boxed_abstract), shardings)
    return abstract, shardings


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a process-local numpy batch onto the mesh as global arrays sharded over the batch.

    Each process passes its own slice (``global_batch / process_count`` rows); the result is a
    global ``jax.Array`` per leaf whose leading axis is split over (data, fsdp).
    """
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, batch)


DISTRIBUTED_ENV = "UNCLIP_JAX_DISTRIBUTED"


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when a multi-process launch is detected.

    ``UNCLIP_JAX_DISTRIBUTED=1`` forces it (a Cloud TPU VM pod slice announces its workers
    only through the metadata server, which ``initialize()`` reads itself) and ``=0`` turns it
    off. Otherwise it is detected from the environment of the usual launchers: an explicit
    ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` for processes
    started by hand), SLURM with more than one task, or a multi-worker TPU on GKE
    (``TPU_WORKER_HOSTNAMES``) or multislice (``MEGASCALE_COORDINATOR_ADDRESS``). All
    arguments (coordinator, process count and id) come from that environment. Returns whether
    it initialised. Call it before anything runs on a device.
    """
    env = os.environ
    forced = env.get(DISTRIBUTED_ENV, "").strip().lower()
    if forced not in ("", "0", "1", "true", "false"):
        raise ValueError(f"{DISTRIBUTED_ENV}={env[DISTRIBUTED_ENV]!r}; accepted: 1 (initialise "
                         f"jax.distributed), 0 (never), or unset (detect from the launcher)")
    if forced in ("0", "false"):
        return False
    multi = (
        forced in ("1", "true")
        or "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
    )
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize(**_explicit_process_args(env))
        return True
    return False


CPU_DEVICES_ENV = "UNCLIP_JAX_CPU_DEVICES"


def split_cpu_cores(max_devices: int = 8) -> int:
    """Expose one XLA CPU device per core (a power of two, at most ``max_devices``) so that a
    data-parallel run on a CPU-only host keeps every core busy; returns the device count asked
    for (0 when it left JAX's default alone).

    XLA:CPU's own threading keeps about 1.4 of 2 cores busy on the shapes models; two devices
    of half a batch each run the decoder's training step 31 % faster (1.45 → 1.90 steps/s,
    batch 32, 2-core EPYC; the losses are identical). ``UNCLIP_JAX_CPU_DEVICES=N`` picks N
    (1 = JAX's single device). It only takes effect before JAX initialises its backends and
    when ``XLA_FLAGS`` does not already set a host device count; accelerator hosts are not
    affected (their computations run on the accelerator)."""
    env = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if env and (not env.isdigit() or int(env) < 1):
        raise ValueError(f"{CPU_DEVICES_ENV}={env!r}; accepted: a positive number of CPU "
                         f"devices (1 = JAX's default single device)")
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = int(env) if env else 2 ** int(np.log2(max(1, min(cores or 1, max_devices))))
    if n <= 1 or _backends_initialized():
        return 0
    jax.config.update("jax_num_cpu_devices", n)
    return n


def _backends_initialized() -> bool:
    """Whether JAX has created its backends (after which the CPU device count is fixed)."""
    from jax._src import xla_bridge      # no public query; absent → assume not initialised

    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def _explicit_process_args(env) -> dict:
    """``num_processes``/``process_id`` from ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` (hand-
    started processes with ``JAX_COORDINATOR_ADDRESS``; launchers JAX knows need neither)."""
    out = {}
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if var in env:
            try:
                out[arg] = int(env[var])
            except ValueError:
                raise ValueError(f"{var}={env[var]!r} is not an integer") from None
    if len(out) == 1:
        raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither")
    return out
