"""What every process of a multi-process test runs (started by :mod:`unclip_jax.commands.launcher`).

``python tests/multiprocess_scenario.py ACTION WORKDIR DATA_DIR``, ACTION one of

* ``chain``: the commands a pod runs, through the command line's own entry point
  (``cli.main``), at a tiny size: ``demo`` (data, tokenizer, CLIP with its evaluation,
  zero-shot eval, ``embed`` through the prior's cache, diffusion prior, decoder, upsampler,
  judged samples and variations), ``train`` of the AR prior, the dVAE and DALL·E (evaluation
  on), then text → image and the manipulations through ``pipelines/`` (written to
  ``pipelines.npz`` by process 0);
* ``clip``: ``train`` of the tiny CLIP alone (the checkpoint tests), extra overrides from
  ``$MP_EXTRA_SETS`` (space separated);
* ``shards``: read ``SHARD_BATCHES`` batches of the webdataset shards in DATA_DIR (placed on
  the mesh of every process's devices), writing each process's rows and the gathered data
  state to ``shards_<process>.json``.

Every process records the source rows it read of every batch (``rows_<process>.json``), so the
test counts that each process read only its own rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "experiments" / "shapes"
SIZES = dict(num_train=128, num_validation=32, num_test=32)


def data_name(resolution: int) -> str:
    from unclip_jax.data.captioned_shapes import dataset_name

    return dataset_name(resolution, **SIZES)


def build_data(data_dir: str | Path) -> None:
    """The two tiny datasets (16 px for the chain, 32 px for the upsampler); run once, in the
    test process, before any launch."""
    from unclip_jax.data.captioned_shapes import build_captioned_shapes

    for resolution in (16, 32):
        build_captioned_shapes(data_dir, resolution=resolution, **SIZES)


TRAIN = ["train.steps=4", "train.batch_size=16", "train.log_every=1", "train.eval_every=2",
         "train.ckpt_every=2", "train.async_checkpoint=true"]
# the CLIP runs longer: the checkpoint tests resume it from step 6 and kill it mid-run
CLIP_TRAIN = ["train.steps=12", "train.batch_size=16", "train.log_every=1",
              "train.eval_every=6", "train.eval_at_end=false", "train.ckpt_every=3",
              "train.keep_checkpoints=5", "train.async_checkpoint=true"]


def clip_sets(data_dir) -> list[str]:
    return [f"data.data_dir={data_dir}", f"data.name={data_name(16)}", "data.image_size=16",
            "data.vocab_size=64", "data.num_workers=0", "model.patch_size=4",
            "model.vision_layers=1", "model.text_layers=1", "model.vision_width=32",
            "model.text_width=32", "model.embed_dim=16", "model.vision_heads=2",
            "model.text_heads=2", "model.vision_colour_blocks=0", "train.ema_decay=0.9",
            *CLIP_TRAIN]


def demo_sets(data_dir, workdir) -> list[str]:
    d16 = [f"data.data_dir={data_dir}", f"data.name={data_name(16)}", "data.image_size=16"]
    prior = d16 + ["model.width=32", "model.depth=1", "model.num_heads=2",
                   "model.sample_steps=4", *TRAIN]
    # the decoder reads the CLIP image embeddings from the cache `embed` wrote (row features)
    decoder = d16 + ["data.vocab_size=64", f"model.embeddings_dir={workdir}/embeddings",
                     "model.base_channels=16", "model.channel_mult=1",
                     "model.attention_resolutions=8", "model.head_channels=16",
                     "model.context_dim=32", "model.text_layers=1", "model.sample_steps=4",
                     *TRAIN]
    upsampler = [f"data.data_dir={data_dir}", f"data.name={data_name(32)}",
                 "data.image_size=32", "model.low_res_size=16", "model.base_channels=16",
                 "model.channel_mult=1", "model.sample_steps=3", *TRAIN]
    return (clip_sets(data_dir) + [f"prior:{s}" for s in prior]
            + [f"decoder:{s}" for s in decoder] + [f"upsampler:{s}" for s in upsampler])


def record_rows(workdir: Path) -> None:
    """Log, per process, the rows it reads of every batch: ``rows_<process>.json`` =
    ``[[train?, examples, global batch, processes, batch number, [row ids...]], ...]`` (row id =
    the source ``index`` for image batches, a hash of the caption tokens for the priors')."""
    import atexit

    import jax

    from unclip_jax.data import input_pipeline

    seen: list = []
    original = input_pipeline.Batches.local_numpy

    def local_numpy(self, i, **kwargs):
        batch = original(self, i, **kwargs)
        seen.append([bool(self.train), self.num_examples, self.batch_size, self.process_count,
                     int(i), [int(v) for v in batch["index"]]])
        return batch

    input_pipeline.Batches.local_numpy = local_numpy

    # the priors' batches of cached embeddings: rows named by a hash of their caption tokens
    for cls in (input_pipeline.EmbeddingBatches,):
        def batch(self, i, _original=cls.batch):
            out = _original(self, i)
            names = [int(hashlib.sha256(row.tobytes()).hexdigest()[:12], 16)
                     for row in np.asarray(out["text_tokens"])]
            seen.append([True, len(next(iter(self.arrays.values()))), self.batch_size,
                         jax.process_count(), int(i), names])
            return out

        cls.batch = batch
    atexit.register(lambda: (workdir / f"rows_{jax.process_index()}.json").write_text(
        json.dumps(seen)))


def run(argv: list[str]) -> None:
    from unclip_jax.commands import cli

    code = cli.main(argv)
    if code:
        raise SystemExit(code)


def pipelines(workdir: Path) -> None:
    """Text → image and the manipulations with the batch split over every process."""
    import jax

    from unclip_jax.core import shapes
    from unclip_jax.pipelines import manipulate, unclip

    model = unclip.load_unclip(workdir / "clip", workdir / "tokenizer.model", workdir / "prior",
                               workdir / "decoder", [workdir / "upsampler"])
    prompts = [shapes.caption(shapes.sample_scene(5, i, "test")) for i in range(8)]
    mesh = unclip.sampling_mesh(len(prompts))
    assert unclip.spans_processes(mesh) == (jax.process_count() > 1), mesh
    renders = [shapes.render(shapes.sample_scene(6, i, "test", num_objects=1), 16)
               for i in range(2)]
    # batch sizes and options of the demo's own calls, so most programs are compiled already
    out = {"generate": unclip.generate(model, prompts, seed=3),
           "variations": manipulate.variations(model, renders[0], n=4, seed=1),
           "interpolate": manipulate.interpolate(model, renders[0], renders[1], frames=4),
           "text_diff": manipulate.text_diff(model, renders[0], prompts[0], prompts[1],
                                             frames=4)}
    if jax.process_index() == 0:
        np.savez(workdir / "pipelines.npz", **out)


def chain(workdir: Path, data_dir: str) -> None:
    run(["demo", "--workdir", str(workdir), "--config-dir", str(SHAPES),
         *sum((["--set", s] for s in demo_sets(data_dir, workdir)), [])])
    d16 = [f"data.data_dir={data_dir}", f"data.name={data_name(16)}", "data.image_size=16",
           "data.num_workers=0"]
    models = {
        "prior_ar": [f"model.embeddings_dir={workdir}/embeddings", "model.pca_dims=4",
                     "model.num_buckets=8", "model.sim_buckets=4", "model.width=32",
                     "model.depth=1", "model.num_heads=2"],
        "dvae": d16 + ["model.image_size=16", "model.encoder_width=16", "model.decoder_width=16",
                       "model.decoder_init_width=16", "model.vocab_size=32"],
        "dalle": d16 + ["data.vocab_size=64", f"data.tokenizer={workdir}/tokenizer.model",
                        f"model.dvae_workdir={workdir}/dvae", f"model.clip_workdir={workdir}/clip",
                        "model.width=32", "model.depth=1", "model.num_heads=2"],
    }
    for name, sets in models.items():
        run(["train", str(SHAPES / f"{name}.py"), "--workdir", str(workdir / name),
             *sum((["--set", s] for s in sets + TRAIN), [])])
    pipelines(workdir)


SHARD_BATCHES = 6
SHARD_STREAM = dict(batch_size=8, image_size=8, shuffle_buffer=4, seed=3)


def read_shards(workdir: Path, shard_dir: str) -> None:
    import jax

    from unclip_jax.core import sharding
    from unclip_jax.data import input_pipeline, shards

    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    it = input_pipeline.StreamBatches(shards.expand_shards(f"{shard_dir}/*.tar"), mesh=mesh,
                                      **SHARD_STREAM)
    rows, gathered = [], []
    for _ in range(SHARD_BATCHES):
        local = it.local_numpy()
        rows.append([[int(a), int(b)] for a, b in zip(local["shard"], local["offset"])])
        placed = sharding.shard_batch(local, mesh)         # the global batch, as training has
        gathered.append(np.asarray(sharding.fetch(placed["shard"])).tolist())
    (workdir / f"shards_{jax.process_index()}.json").write_text(json.dumps(
        {"rows": rows, "gathered": gathered, "state": it.state(),
         "skipped": it.skipped_samples()}))


def main() -> None:
    action, workdir, data_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    workdir.mkdir(parents=True, exist_ok=True)
    if action == "shards":
        return read_shards(workdir, data_dir)
    record_rows(workdir)
    if action == "chain":
        chain(workdir, data_dir)
    elif action == "clip":
        extra = os.environ.get("MP_EXTRA_SETS", "").split()
        run(["train", str(SHAPES / "clip.py"), "--workdir", str(workdir),
             *sum((["--set", s] for s in clip_sets(data_dir) + extra), [])])
    else:
        raise SystemExit(f"unknown action {action!r}; accepted: chain, clip, shards")


if __name__ == "__main__":
    main()
