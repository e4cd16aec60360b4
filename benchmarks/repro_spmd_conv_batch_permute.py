"""Standalone repro: XLA's SPMD partitioner puts examples on the wrong devices in a sharded conv.

One ``lax.conv_general_dilated`` on 8 fake CPU devices, mesh ``data=2 × fsdp=2 × model=2``:

* input ``[8, 4, 4, 8]`` (NHWC) split ``P(("data", "fsdp"), None, None, "model")``,
* kernel ``[3, 3, 8, 8]`` (HWIO) split ``P(None, None, "model", "fsdp")``,
* output requested as ``P(("data", "fsdp"), None, None, "model")``.

The partitioned program (``--xla_dump_hlo_pass_re=spmd-partitioning``) collective-permutes the
input's batch shards between devices 2↔4 and 3↔5 (so that its batch is laid out fsdp-major,
like the kernel's fsdp shards), all-gathers the kernel over fsdp, convolves, all-reduces over
model and slices the output channels — but never permutes the batch back: output rows 2-3 and
4-5 are swapped. GSPMD propagation fails the same way when given these shardings; larger
images (8×8) or batches (16) make the partitioner pick another strategy and come out right.

This is exactly the input gradient of a conv whose kernel is stored ``[.., fsdp, model]`` (the
``fsdp_tp`` layout of ``conv_in``/``conv_out``), which is how the dVAE's gradients on the full
3-axis mesh came out wrong (``tests/test_sharded_models.py``). The workaround,
:func:`unclip_jax.core.sharding.gathered_kernel_conv`, gathers the kernel's fsdp shards explicitly
before the conv, so no conv ever sees a kernel split over a batch axis; the last line checks it.

Run: ``python benchmarks/repro_spmd_conv_batch_permute.py`` (CPU, a few seconds). Exits 1 when
the unworked-around conv is wrong, 0 once XLA is fixed.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main() -> int:
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    spec = lambda *s: NamedSharding(mesh, P(*s))  # noqa: E731
    r = np.random.default_rng(0)
    x = r.normal(size=(8, 4, 4, 8)).astype(np.float32)
    k = r.normal(size=(3, 3, 8, 8)).astype(np.float32)
    ref = np.asarray(jax.jit(conv)(x, k))
    act, kernel = spec(("data", "fsdp"), None, None, "model"), spec(None, None, "model", "fsdp")
    out = np.asarray(jax.jit(conv, in_shardings=(act, kernel), out_shardings=act)(x, k))
    rows_ok = [bool(np.allclose(out[i], ref[i], atol=1e-4)) for i in range(8)]
    swapped = np.r_[0:2, 4:6, 2:4, 6:8]
    print(f"jax {jax.__version__}: rows equal to the unsharded conv: {rows_ok}")
    print(f"  output == reference with batch shards 1 and 2 swapped: "
          f"{bool(np.allclose(out, ref[swapped], atol=1e-4))}")

    # Where the models meet it: the input gradient of a kernel stored [.., fsdp, model] is a
    # conv with the transposed kernel [.., model, fsdp]. Two stacked convs, scaled and
    # constrained to the batch split (as a residual branch is), differentiated; then the same
    # with the workaround, which gathers the kernels' fsdp shards before each conv.
    from unclip_jax.core import sharding

    k1, k2 = (r.normal(size=(3, 3, 8, 8)).astype(np.float32) for _ in range(2))
    w = r.normal(size=x.shape).astype(np.float32)
    batch = spec(("data", "fsdp"))
    stored = spec(None, None, "fsdp", "model")
    gathered = sharding.gathered_kernel_conv((None, None, None, "conv_out"))

    def loss(x, k1, k2, conv_fn):
        two = lambda a, k: conv_fn(a, k, (1, 1), "SAME",  # noqa: E731
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.lax.with_sharding_constraint(0.25 * two(two(x, k1), k2), batch)
        return (y * w).sum()

    grads = lambda fn: jax.grad(lambda *a: loss(*a, fn), argnums=(0, 1))  # noqa: E731
    ref_g = jax.jit(grads(jax.lax.conv_general_dilated))(x, k1, k2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules("fsdp_tp")):
        for label, fn in (("plain lax conv", jax.lax.conv_general_dilated),
                          ("sharding.gathered_kernel_conv", gathered)):
            got = jax.jit(grads(fn), in_shardings=(batch, stored, stored))(x, k1, k2)
            errs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(a)))
                    for a, b in zip(ref_g, got)]
            print(f"  grad of two stacked convs, {label}: relative error dx {errs[0]:.1e}, "
                  f"dk1 {errs[1]:.1e}")
    return 0 if all(rows_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
