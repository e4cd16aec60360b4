"""The benchmark harness: backend-specific sections are skipped elsewhere, and the GPU MFU
section divides the right counts."""

import importlib.util
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_skips_a_benchmark_of_another_backend(capsys):
    run_all = _load("run_all")

    def boom():
        raise AssertionError("a gpu benchmark must not run on the cpu backend")

    gpu_only = types.SimpleNamespace(BACKEND="gpu", run=boom)
    assert run_all._run_section(gpu_only, Path("bench_fake.py")) is None
    assert "skipping bench_fake: it measures a gpu" in capsys.readouterr().out
    cpu_only = types.SimpleNamespace(BACKEND="cpu", run=lambda: "## section\n")
    assert run_all._run_section(cpu_only, Path("bench_fake.py")) == "## section"


def test_gpu_section_mfu_uses_the_larger_flop_count():
    g = _load("bench_gpu")
    env = dict(kind="NVIDIA H200", nominal=4e12, measured=2e12, n=8192, jax="x")
    row = dict(name="scanned", dtype="bfloat16", batch=8, params=1e9, flops=1e12,
               analytic=2e12, sec=1.0, compile_s=3.0)
    unscanned = dict(row, name="unscanned", analytic=None)
    text = g.format_section(env, [row, unscanned], None, ["- a note"])
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "**50.0%**" in lines["| scanned"]          # analytic 2e12 / 1 s / 4e12
    assert "**25.0%**" in lines["| unscanned"]        # the XLA count when there is no other
    assert "measured in the same process: 2 TFLOP/s (50% of that peak)" in text
    assert text.rstrip().endswith("- a note")


@pytest.mark.parametrize("kind, tflops", [("NVIDIA H200", 989.5), ("NVIDIA H100 80GB HBM3",
                                                                   989.5), ("cpu", None)])
def test_nominal_peak_by_device_name(kind, tflops):
    g = _load("bench_gpu")
    peak, name = g.nominal_peak(types.SimpleNamespace(device_kind=kind))
    assert name == kind
    assert peak == (None if tflops is None else tflops * 1e12)


def test_decoder_step_profile_counts_self_time_by_kind():
    b = _load("bench_decoder_recipes")
    def conv(window, op=""):
        return (f"%c = f32[32,16,16,64] convolution(%p0, %p1), window={{size={window} "
                f"pad=1_1x1_1}}, {op}")

    fused = {"ynn_fusion.7": conv("3x3", 'op_name="jit(step)/jvp(Decoder)/conv"'),
             "ynn_fusion.8": conv("16x16"),      # a kernel gradient: the window spans the image
             "ynn_fusion.9": conv("3x3", 'op_name="jit(step)/transpose(jvp(Decoder))/conv"'),
             "ynn_fusion.10": "%d = f32[8192,32] dot(%p0, %p1)",
             # a GroupNorm's statistics (backward), the optimiser's moment update, a SiLU
             "reduce_fusion.4": 'op_name="jit(step)/transpose(jvp(Decoder))/unet/up_0_res_0/'
                                'norm_2/reduce_sum"',
             "sqrt_fusion.5": 'op_name="jit(step)/sqrt" op_name="jit(step)/div"',
             "logistic_fusion.6": 'op_name="jit(step)/jvp(Decoder)/unet/up_0_res_0/logistic"'}
    names = [dict(ph="M", tid=1, name="thread_name", args={"name": "tf_XLAEigen/1"}),
             dict(ph="M", tid=2, name="thread_name", args={"name": "python"})]
    spans = [("all-reduce.1", 0, 100), ("Rendezvous", 10, 80), ("Wait: pending", 20, 60),
             ("ynn_fusion.7", 100, 50), ("ynn_fusion.8", 150, 30), ("ynn_fusion.9", 180, 10),
             ("ynn_fusion.10", 190, 4), ("transpose_copy_fusion.3", 194, 4),
             ("ThunkExecutor::Execute", 0, 200), ("add_select_fusion.2", 198, 2),
             ("reduce_fusion.4", 200, 8), ("sqrt_fusion.5", 208, 6), ("logistic_fusion.6", 214, 3)]
    events = names + [dict(ph="X", tid=1, name=n, ts=t * 1000, dur=d * 1000)    # µs
                      for n, t, d in spans]
    events.append(dict(ph="X", tid=2, name="ynn_fusion.7", ts=0, dur=999))   # not a worker
    where = b.where_the_time_goes(events, fused, steps=1)
    assert {k: v["ms"] for k, v in where.items()} == {
        "all-reduce and waits": 100, "conv forward": 50, "conv kernel gradient": 30,
        "conv input gradient": 10, "matmul": 4, "layout copies": 4, "normalisation": 8,
        "update": 6, "other": 5}
    assert where["all-reduce and waits"]["share"] == round(100 / 217, 3)


def test_self_conditioned_recipe_step_weighs_its_two_branches(monkeypatch):
    """A self-conditioned recipe's step runs the first forward pass on a share p of the
    batches: its cost is p · (the step with it) + (1 − p) · (the step without), each branch
    timed with the coin forced; a recipe without self-conditioning is timed once, as it is."""
    b = _load("bench_decoder_recipes")
    calls = []

    def fake(name, clip, emb, profile=False, extra=()):
        calls.append(list(extra))
        forced = float(extra[0].split("=")[1]) if extra else 0.0
        return {"recipe": name, "s_per_step": 0.9 if forced > 0.5 else 0.6}

    monkeypatch.setattr(b, "child_step", fake)
    row = b.child("p2ln_cls_b64_lr3e3_tdrop02_snr2_sc05", "nowhere/clip", "nowhere/emb")
    assert row["s_per_step"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.6)
    assert row["s_per_step_by_branch"] == {"with_estimate": 0.9, "without": 0.6}
    assert calls == [[f"model.self_condition={b.ALWAYS}"], [f"model.self_condition={b.NEVER}"]]
    calls.clear()
    assert b.child("patch2_b64", "nowhere/clip", "nowhere/emb")["s_per_step"] == 0.6
    assert calls == [[]]
