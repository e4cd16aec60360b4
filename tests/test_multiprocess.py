"""Several JAX processes on this machine give what one process gives (``make test-multiprocess``).

Every test starts real processes with :mod:`unclip_jax.commands.launcher` (2 processes × 2 CPU
devices
against 1 process × 4, gloo collectives between them), as the hosts of a pod slice run:

* the chain (``tests/multiprocess_scenario.py chain``): ``demo`` (CLIP, zero-shot eval,
  ``embed``, diffusion prior, decoder, upsampler, judged samples, variations), ``train`` of the
  AR prior, dVAE and DALL·E with their periodic evaluations, text → image and the
  manipulations through ``pipelines/`` — the same losses, evaluations, final params, embedding
  cache and images whatever the number of processes, and each process read only its rows;
* checkpoints move between process counts, and a killed host neither hangs its peer nor
  changes the resumed run;
* processes started wrongly fail at start with a message naming what differs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from unclip_jax.commands import launcher as launch

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[1]
SCENARIO = str(REPO / "tests" / "multiprocess_scenario.py")
sys.path.insert(0, str(REPO / "tests"))
import multiprocess_scenario as scenario  # noqa: E402

HEARTBEAT_S = 10          # a dead peer is noticed after this (UNCLIP_JAX_HEARTBEAT_TIMEOUT)
ENV = {"UNCLIP_JAX_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S), "UNCLIP_JAX_INIT_TIMEOUT": "120"}
LAYOUTS = {"1x4": (1, 4), "2x2": (2, 2)}
MODELS = ("clip", "prior", "decoder", "upsampler", "prior_ar", "dvae", "dalle")
CHAIN_TIMEOUT_S = 3600    # a hang guard only, far above the chain's time even on a loaded machine
RTOL = 1e-5               # float32 runs on 4 devices split 1×4 or 2×2


def run_processes(argv, layout, log_dir, check=True, timeout=1200, **kwargs):
    n, d = LAYOUTS[layout] if isinstance(layout, str) else layout
    kwargs.setdefault("cwd", REPO)
    return launch.launch(argv, processes=n, devices=d, timeout=timeout, log_dir=log_dir,
                         env={**ENV, **kwargs.pop("env", {})}, check=check, **kwargs)


@pytest.fixture
def launched(tmp_path):
    """``launched(argv, layout="2x2", **options) -> [ProcessResult]``: ``argv`` run in every
    process of ``layout`` ("1x4", "2x2" or ``(processes, devices)``), logs under
    ``tmp_path/launch_<k>``; raises :class:`~unclip_jax.commands.launcher.LaunchError` (naming the
    failed
    or stuck process) unless ``check=False``."""
    count = iter(range(1000))

    def run(argv, layout="2x2", **options):
        return run_processes(argv, layout, tmp_path / f"launch_{next(count)}", **options)

    return run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpdata")
    scenario.build_data(root)
    return root


@pytest.fixture(scope="module")
def tokenizer(data_dir, tmp_path_factory) -> Path:
    """The tiny CLIP's tokenizer, trained here (for the runs that fail before training)."""
    import dataclasses

    from unclip_jax.core.config import DataConfig
    from unclip_jax.train.tasks import ensure_tokenizer, tokenizer_path

    workdir = tmp_path_factory.mktemp("tok")
    cfg = DataConfig(name=scenario.data_name(16), data_dir=str(data_dir), vocab_size=64)
    ensure_tokenizer(cfg, workdir)
    return tokenizer_path(dataclasses.replace(cfg, tokenizer=""), workdir)


@pytest.fixture(scope="module")
def chains(data_dir, tmp_path_factory):
    """The whole chain once per layout, both layouts at the same time (the one-process run
    compiles mostly on one core, leaving the other to the two-process run): ``{"1x4":
    workdir, "2x2": workdir}``."""
    root = tmp_path_factory.mktemp("chains")
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    clusters = {layout: launch.LocalCluster(
        ["python", SCENARIO, "chain", str(root / layout), str(data_dir)], processes=n,
        devices=d, timeout=CHAIN_TIMEOUT_S, log_dir=root / f"{layout}_logs", env=ENV, cwd=REPO)
        for layout, (n, d) in LAYOUTS.items()}
    with contextlib.ExitStack() as stack:
        for cluster in clusters.values():
            stack.enter_context(cluster)
        for layout, cluster in clusters.items():
            results = cluster.wait()
            print(f"\nchain {layout}: " + ", ".join(f"process {r.index} {r.seconds:.0f} s"
                                                    for r in results), flush=True)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    print(f"chains: {time.perf_counter() - t0:.0f} s wall, {cpu:.0f} CPU-s, 1-min load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    return {layout: root / layout for layout in LAYOUTS}


# ----------------------------------------------------------------------------- comparisons


def metric_rows(workdir: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def assert_metrics_close(a: Path, b: Path, steps=None) -> None:
    ra, rb = metric_rows(a), metric_rows(b)
    steps = sorted(ra) if steps is None else steps
    assert steps and set(steps) <= set(ra) and set(steps) <= set(rb), (sorted(ra), sorted(rb))
    for s in steps:
        assert ra[s].keys() == rb[s].keys(), (s, ra[s].keys() ^ rb[s].keys())
        for key in ra[s]:
            if key == "steps_per_s":
                continue
            np.testing.assert_allclose(rb[s][key], ra[s][key], rtol=RTOL, atol=1e-7,
                                       err_msg=f"{a.name} step {s} {key}")


def params(workdir: Path, which="params"):
    from unclip_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, async_save=False)
    try:
        return jax.tree.map(np.asarray, ckpt.restore_params(which=which)), ckpt.latest_step()
    finally:
        ckpt.close()


def assert_params_close(a: Path, b: Path, exact: bool = False) -> None:
    """Final params of two runs: bit for bit (``exact``), or within ``RTOL`` relative to the
    model's parameter scale — every element (``|a − b| ≤ RTOL · max |b|`` over the model) and
    the whole tree in L2. Relative to the scale, not to each element or leaf: leaves that start
    at 0 and move by a few Adam steps (biases), or whose gradient is 0 in exact arithmetic
    (attention key biases, ~1e-6 of rounding noise), have no size of their own."""
    (pa, sa), (pb, sb) = params(a), params(b)
    assert sa == sb
    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(p)[0] for p in (pa, pb))
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    scale = max(float(np.max(np.abs(y))) for _, y in flat_b)
    sq_diff = sq_norm = 0.0
    for (path, x), (_, y) in zip(flat_a, flat_b):
        name = f"{a.name}{jax.tree_util.keystr(path)}"
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=name)
            continue
        diff = np.abs(x.astype(np.float64) - y)
        assert float(diff.max()) <= RTOL * scale, (name, float(diff.max()), scale)
        sq_diff += float(np.sum(diff ** 2))
        sq_norm += float(np.sum(np.square(y, dtype=np.float64)))
    assert np.sqrt(sq_diff) <= RTOL * np.sqrt(sq_norm), a.name


def test_every_model_trains_and_evaluates_the_same_on_two_processes(chains):
    """Losses, periodic evaluations and final params of all seven trainable models."""
    for name in MODELS:
        one, two = chains["1x4"] / name, chains["2x2"] / name
        evals = [s for s, r in metric_rows(one).items() if any(k.startswith("eval/") for k in r)]
        if name not in ("decoder", "upsampler"):      # these two have no evaluation
            assert evals, f"{name}: no evaluation ran"
        assert_metrics_close(one, two)
        assert_params_close(one, two)
    assert json.loads((chains["2x2"] / "clip" / "eval.json").read_text())["zs_colour"] == \
        pytest.approx(json.loads((chains["1x4"] / "clip" / "eval.json").read_text())["zs_colour"])


def test_embedding_cache_is_the_same_and_split_over_the_processes(chains):
    from unclip_jax.train import embeddings

    for split in ("train", "validation"):
        one = embeddings.load_split(chains["1x4"] / "embeddings", split)
        two = embeddings.load_split(chains["2x2"] / "embeddings", split)
        assert one.keys() == two.keys()
        for key in one:
            if one[key].dtype.kind == "f":      # relative to the array's scale, as params;
                a, b = (x.astype(np.float64) for x in (one[key], two[key]))
                # text_states are stored in float16: a rounding step may flip
                step = 2.0 ** -10 * np.abs(a) if one[key].dtype == np.float16 else 0.0
                bound = RTOL * np.abs(a).max() + step
                assert np.all(np.abs(a - b) <= bound), (split, key, np.abs(a - b).max())
            else:
                np.testing.assert_array_equal(two[key], one[key], err_msg=f"{split} {key}")
    # each process embedded only its rows: the evaluation streams read by embed (the only
    # process-split evaluation streams) tile every example exactly once
    reads = [json.loads((chains["2x2"] / f"rows_{p}.json").read_text()) for p in range(2)]
    split_eval = [[r for r in rs if not r[0] and r[3] == 2] for rs in reads]
    assert all(split_eval)
    for n in {r[1] for r in split_eval[0]}:             # one stream per dataset split size
        per_process = [[i for r in rs if r[1] == n for i in r[5]] for rs in split_eval]
        assert len(per_process[0]) == len(per_process[1])
        b = split_eval[0][0][2]
        for p, rows in enumerate(per_process):          # process p: rows [p·B/2, (p+1)·B/2)
            batches = [r for r in split_eval[p] if r[1] == n]
            for r in batches:
                first = r[4] * b + p * b // 2
                expect = [min(k, n - 1) for k in range(first, first + b // 2)]
                assert r[5] == expect
        real = [i for rows in per_process for i in rows]
        assert sorted(set(real)) == list(range(n))      # every example, padding aside


def test_each_process_reads_only_its_rows_of_every_training_batch(chains):
    """Counted: for every training batch of every model (image batches and the priors'
    embedding batches), process p of 2 read B/2 rows, and together they are the rows the
    single process read for that batch."""
    def by_batch(records):
        """``{(examples, batch size, batch number, k): record}`` for the k-th read of that
        batch (several models read the same stream; loaders read in order, no threads)."""
        out, seen = {}, collections.Counter()
        for r in records:
            if r[0]:
                key = (r[1], r[2], r[4])
                out[key + (seen[key],)] = r
                seen[key] += 1
        return out

    full = by_batch(json.loads((chains["1x4"] / "rows_0.json").read_text()))
    halves = [by_batch(json.loads((chains["2x2"] / f"rows_{p}.json").read_text()))
              for p in range(2)]
    assert full.keys() == halves[0].keys() == halves[1].keys()
    # CLIP 12 batches, then 4 for each of the prior, decoder, upsampler, AR prior, dVAE, DALL·E
    # (and the prior's batch 0 once more, read for its shapes)
    assert len(full) >= 12 + 6 * 4
    for key, one in full.items():
        two = [h[key] for h in halves]
        b = one[2]
        assert one[3] == 1 and two[0][3] == two[1][3] == 2
        assert len(one[5]) == b and all(len(t[5]) == b // 2 for t in two), key
        assert two[0][5] + two[1][5] == one[5], key


def test_sampling_and_manipulations_are_split_over_the_processes(chains):
    """Text → image and the manipulations through pipelines/ (batches split over both
    processes' devices, then gathered): the images of one process. The judged demo samples
    agree too."""
    one = np.load(chains["1x4"] / "pipelines.npz")
    two = np.load(chains["2x2"] / "pipelines.npz")
    assert set(one.files) == {"generate", "variations", "interpolate", "text_diff"}
    for key in one.files:
        a, b = one[key].astype(int), two[key].astype(int)
        assert a.shape == b.shape
        # uint8 of float images equal to ~1e-6: a value may round the other way
        assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.01, key
    s1 = json.loads((chains["1x4"] / "samples.json").read_text())
    s2 = json.loads((chains["2x2"] / "samples.json").read_text())
    for key in ("single_colour_shape", "two_both_colour_shape", "relation", "exact",
                "variation_consistency", "clip_score", "fd_clip", "diversity"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-4), key


def test_demo_writes_its_report_and_images(chains):
    for layout, workdir in chains.items():
        for name in ("report.md", "report.json", "samples.png", "variations.png",
                     "samples.json", "stage_times.json"):
            assert (workdir / name).is_file(), (layout, name)


# ----------------------------------------------------------------------------- checkpoints


def clip_extra(chains, layout) -> str:
    return f"data.tokenizer={chains[layout] / 'tokenizer.model'}"


def cut_after(src: Path, dst: Path, step: int) -> None:
    """A copy of the run ``src`` as if it had stopped after the checkpoint at ``step``."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)


@pytest.mark.parametrize("saved,resumed", [("2x2", "1x4"), ("1x4", "2x2")])
def test_checkpoint_resumes_on_another_process_count(chains, data_dir, tmp_path, launched,
                                                     saved, resumed):
    """A CLIP saved at step 6 by one layout continues on the other to step 12 and ends where
    the uninterrupted run of that layout ends."""
    workdir = tmp_path / "clip"
    cut_after(chains[saved] / "clip", workdir, 6)
    results = launched(["python", SCENARIO, "clip", str(workdir), str(data_dir)], resumed,
                       env={"MP_EXTRA_SETS": clip_extra(chains, saved)})
    assert "resumed from" in results[0].log and "(step 6, data position 6)" in results[0].log
    reference = chains[resumed] / "clip"
    assert_metrics_close(reference, workdir, steps=list(range(7, 13)))
    assert_params_close(reference, workdir)


def test_killed_process_stops_its_peer_and_restart_resumes_bitwise(chains, data_dir,
                                                                    tmp_path, launched):
    """SIGKILL of process 1 mid-run (during the evaluation after step 6, while checkpoint 6 is
    being written): process 0 exits with an error naming the dead task within the heartbeat
    timeout (no hang); the same command again resumes, bit for bit the uninterrupted
    2-process run."""
    workdir = tmp_path / "clip"
    argv = ["python", SCENARIO, "clip", str(workdir), str(data_dir)]
    env = {**ENV, "MP_EXTRA_SETS": clip_extra(chains, "2x2")}
    cluster = launch.LocalCluster(argv, processes=2, devices=2, timeout=1200,
                                  grace=3 * HEARTBEAT_S + 30, log_dir=tmp_path / "killed",
                                  env=env, cwd=REPO)
    with cluster:
        deadline = time.monotonic() + 900
        while "step 6:" not in cluster.read_log(0):
            assert time.monotonic() < deadline, cluster.read_log(0)[-3000:]
            assert all(p.poll() is None for p in cluster.procs), "finished before the kill"
            time.sleep(0.05)
        cluster.kill(1, signal.SIGKILL)
        killed_at = time.monotonic()
        results = cluster.wait(check=False)
    survivor = results[0]
    assert results[1].returncode == -signal.SIGKILL
    assert not survivor.stuck and survivor.returncode != 0
    assert cluster.procs[0].returncode is not None
    waited = survivor.seconds - (killed_at - cluster._t0)
    assert waited < 3 * HEARTBEAT_S + 20, f"process 0 took {waited:.0f} s to stop"
    assert "stopped sending heartbeats" in survivor.log or "another task died" in survivor.log, \
        survivor.log[-2000:]

    restarted = launched(argv, "2x2", env={"MP_EXTRA_SETS": clip_extra(chains, "2x2")})
    assert "resumed from" in restarted[0].log
    reference = chains["2x2"] / "clip"
    assert_params_close(reference, workdir, exact=True)
    ra, rb = metric_rows(reference), metric_rows(workdir)
    for s in range(1, 13):
        assert {k: v for k, v in ra[s].items() if k != "steps_per_s"} == \
            {k: v for k, v in rb[s].items() if k != "steps_per_s"}, s


# ----------------------------------------------------------------------------- bad input


def clip_train_argv(tokenizer, data_dir, workdir, *extra) -> list[str]:
    sets = scenario.clip_sets(data_dir) + [f"data.tokenizer={tokenizer}", *extra]
    return ["unclip-jax", "train", str(scenario.SHAPES / "clip.py"), "--workdir", str(workdir),
            *sum((["--set", s] for s in sets), [])]


def failed_logs(results) -> list[str]:
    assert all(r.returncode not in (0, None) for r in results), [r.state() for r in results]
    return [r.log for r in results]


def test_different_configs_fail_at_start_naming_the_section(tokenizer, data_dir, tmp_path,
                                                            launched):
    argv = clip_train_argv(tokenizer, data_dir, tmp_path / "w")
    results = launched(argv, check=False, timeout=300,
                       per_process_args={1: ["--set", "optim.learning_rate=0.1"]})
    for log in failed_logs(results):
        assert "were not started with the same run" in log
        assert "config.optim differs" in log and "process(es) 1" in log
        assert "config.train" not in log
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_different_code_fails_at_start(tokenizer, data_dir, tmp_path, launched):
    """Process 1 imports a copy of the package with one changed line."""
    other = tmp_path / "other_code"
    shutil.copytree(REPO / "unclip_jax", other / "unclip_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "unclip_jax" / "shapes.py", "a") as f:
        f.write("\n# a local edit on one host\n")
    argv = clip_train_argv(tokenizer, data_dir, tmp_path / "w")
    # run outside the repository (whose folder `python -m` would put first on sys.path)
    results = launched(argv, check=False, timeout=300,
                       per_process_env={1: {"PYTHONPATH": str(other)}}, cwd=tmp_path)
    for log in failed_logs(results):
        assert "code (unclip_jax sources) differs" in log


def test_different_workdir_fails_at_start(tokenizer, data_dir, tmp_path, launched):
    argv = clip_train_argv(tokenizer, data_dir, tmp_path / "a")
    results = launched(argv, check=False, timeout=300,
                       per_process_args={1: ["--workdir", str(tmp_path / "b")]})
    for log in failed_logs(results):
        assert "--workdir differs" in log and "file system every host sees" in log


def test_batch_not_divisible_by_the_process_count(tokenizer, data_dir, tmp_path, launched):
    argv = clip_train_argv(tokenizer, data_dir, tmp_path / "w", "train.batch_size=3")
    results = launched(argv, check=False, timeout=300)
    for log in failed_logs(results):
        assert "global batch size 3 is not divisible by the process count 2" in log


def test_unreachable_coordinator_fails_in_bounded_time_naming_it(tmp_path):
    """Process 1 of 2 whose coordinator never starts: a clear error within the wait."""
    port = launch.free_port()
    env = launch.process_env(1, 2, 1, f"127.0.0.1:{port}")
    env["UNCLIP_JAX_INIT_TIMEOUT"] = "3"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "unclip_jax.commands.cli", "train",
                           str(scenario.SHAPES / "clip.py"), "--workdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot reach the JAX coordinator at 127.0.0.1:{port}" in proc.stderr
    assert "after 3 s" in proc.stderr
    assert time.monotonic() - t0 < 60


# ----------------------------------------------------------------------------- webdataset shards


def test_shard_stream_is_split_over_processes_by_shard(tmp_path, launched):
    """2 processes × 2 devices read webdataset shards: each process reads only its own shards
    (disjoint), process p's rows are reader p's rows of the one-process run with two loader
    workers, the union over one epoch is every sample once, and every process saves the same
    data state (gathered from both)."""
    import test_webdataset as wds
    from unclip_jax.data import shards
    from unclip_jax.data.input_pipeline import StreamBatches

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in range(4):
        files = {}
        for i in range(6):
            files.update(wds.members(s, i, ("png", "jpg")[i % 2]))
        wds.write_tar(shard_dir / f"{s:05d}.tar", files)
    workdir = tmp_path / "run"
    launched(["python", SCENARIO, "shards", str(workdir), str(shard_dir)], "2x2", timeout=300)
    out = [json.loads((workdir / f"shards_{p}.json").read_text()) for p in range(2)]

    one = StreamBatches(shards.expand_shards(f"{shard_dir}/*.tar"), num_workers=2,
                        process_index=0, process_count=1, **scenario.SHARD_STREAM)
    single = [one.local_numpy() for _ in range(scenario.SHARD_BATCHES)]
    one.close()
    for p in range(2):
        for i, b in enumerate(single):
            pairs = [[int(a), int(c)] for a, c in zip(b["shard"], b["offset"])]
            assert out[p]["rows"][i] == pairs[p::2], (p, i)
            # the global batch on the mesh: process 0's rows, then process 1's
            assert out[p]["gathered"][i] == [r[0] for r in out[0]["rows"][i] + out[1]["rows"][i]]
    # batches 0-2 and 3-5 are epochs 0 and 1 (each reader: 2 shards × 6 samples = 12 rows);
    # in each, the processes read disjoint shards (dealt afresh each epoch) and every sample once
    for epoch in (slice(0, 3), slice(3, 6)):
        read = [[tuple(r) for batch in o["rows"][epoch] for r in batch] for o in out]
        assert not {s for s, _ in read[0]} & {s for s, _ in read[1]}
        assert sorted(read[0] + read[1]) == sorted((s, i) for s in range(4) for i in range(6))
    assert out[0]["state"] == out[1]["state"] and out[0]["state"]["readers"] == [2, 1]
    assert out[0]["skipped"] == out[1]["skipped"] == dict.fromkeys(shards.SKIP_REASONS, 0)


# ----------------------------------------------------------------------------- coco-fid


def test_coco_fid_is_the_same_on_two_processes(tmp_path, launched):
    """``coco-fid`` on 2 processes × 2 devices (stopped after one chunk, then resumed) gives
    the chunks and FID of 1 process × 4; each process decodes only its share of the real
    images (gathered), process 0 writes."""
    import test_coco_fid as cf
    from tiny import write_tiny_unclip

    cf._write_coco(tmp_path / "coco")
    chain = write_tiny_unclip(tmp_path / "chain")
    np.savez(tmp_path / "inception.npz", **cf.random_inception())

    def argv(out, *extra):
        return ["python", "-m", "unclip_jax.commands.cli", "coco-fid",
                "--coco", str(tmp_path / "coco"),
                "--inception", str(tmp_path / "inception.npz"), "--clip", str(chain / "clip"),
                "--prior", str(chain / "prior"), "--decoder", str(chain / "decoder"),
                "--upsampler", str(chain / "upsampler"), "--num", "6", "--chunk-size", "4",
                "--batch-size", "4", "--resolution", "32", "--inception-size", str(cf.SIZE),
                "--out", str(out), *extra]

    launched(argv(tmp_path / "one"), "1x4", timeout=900)
    launched(argv(tmp_path / "two", "--max-chunks", "1"), "2x2", timeout=900)
    assert not (tmp_path / "two" / "results.json").exists()
    launched(argv(tmp_path / "two"), "2x2", timeout=900)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["settings"] == two["settings"] and one["num_samples"] == two["num_samples"] == 6
    for k in range(2):
        with np.load(tmp_path / f"one/chunk_{k:05d}.npz") as a, \
                np.load(tmp_path / f"two/chunk_{k:05d}.npz") as b:
            np.testing.assert_array_equal(a["image_id"], b["image_id"])
            np.testing.assert_allclose(b["real"], a["real"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(b["clip_score"], a["clip_score"], atol=0.5)
    assert two["fid"] == pytest.approx(one["fid"], rel=0.02)
