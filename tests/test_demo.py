"""The demo's bookkeeping without training: stage times survive re-runs that only skip, finished
training runs are recognised, the report shows the sample metrics and both time columns."""

import json

import numpy as np
import pytest

from unclip_jax.commands import demo
from unclip_jax.core import shapes
from unclip_jax.core.config import DataConfig, ExperimentConfig, TrainConfig


def test_stage_time_is_kept_from_the_run_that_did_the_work(tmp_path):
    report: dict = {}
    demo.run_stage(report, tmp_path, "clip", lambda: {"x": 1}, done=lambda: False)
    first = demo.read_times(tmp_path)["clip"]
    assert report["wall_s"]["clip"] == first and report["clip"] == {"x": 1}
    assert "skip_s" not in report
    # pretend the training took 845 s; a re-run that finds it finished must not overwrite it
    (tmp_path / demo.TIMES_FILE).write_text(json.dumps({"clip": 845.0}))
    again: dict = {}
    demo.run_stage(again, tmp_path, "clip", lambda: None, done=lambda: True)
    assert again["wall_s"]["clip"] == 845.0
    assert "clip" in again["skip_s"] and "clip" not in again
    assert demo.read_times(tmp_path) == {"clip": 845.0}
    # a finished stage whose working run predates the times file: unknown, not the skip time
    unknown: dict = {}
    demo.run_stage(unknown, tmp_path, "prior", lambda: None, done=lambda: True)
    assert unknown["wall_s"]["prior"] is None and "prior" in unknown["skip_s"]


def test_trained_needs_a_complete_checkpoint_at_the_final_step(tmp_path):
    assert not demo.is_trained(tmp_path, 5)
    for step, complete in ((3, True), (5, True), (7, False)):
        for item in ("data", "config"):
            d = tmp_path / "checkpoints" / str(step) / item
            d.mkdir(parents=True)
            if complete:
                (d / "metadata").write_text("{}")
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp").mkdir()
    assert demo.is_trained(tmp_path, 5) and demo.is_trained(tmp_path, 4)
    assert not demo.is_trained(tmp_path, 6)           # step 7 is half written, 9 a temp folder


class _ColourClip:
    """Image feature = mean RGB / 255; caption feature = the palette colour of its first
    object / 255 (so a render and its caption point the same way)."""

    def images(self, images):
        return np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(1) / 255

    def texts(self, captions):
        return np.stack([shapes.PALETTE[shapes.COLOURS.index(
            shapes.parse_caption(c).objects[0].colour)] / 255 for c in captions])


def test_sample_metrics_and_report_markdown():
    scenes = [shapes.sample_scene(3, i, "test", num_objects=1) for i in range(6)]
    renders = np.stack([shapes.render(s, 16) for s in scenes])
    prompts = [shapes.caption(s) for s in scenes]
    other = np.stack([shapes.render(shapes.sample_scene(4, i, "test", num_objects=1), 16)
                      for i in range(6)])
    m = demo.sample_metrics(_ColourClip(), renders, prompts, renders, other)
    assert m["fd_clip"] == pytest.approx(0.0, abs=1e-9)             # generated == real
    assert m["fd_clip_real_vs_real"] > 0
    assert m["clip_score"] == m["clip_score_real"] > 50
    assert m["diversity"] == m["diversity_real"] > 0
    assert (m["num_samples"], m["feature_dim"]) == (6, 3)

    samples = dict(m, single_colour_shape=0.5, two_both_colour_shape=0.25, relation=0.75,
                   exact=0.1, variation_consistency=0.0, num_varied=5, num_single=3, num_two=3,
                   resolution=16, generate_8_after_compile_s=1.5)
    report = {"clip_eval": {"zs_colour": 1.0, "probe_shape": 0.625}, "samples": samples,
              "wall_s": {"clip": 845.0, "prior": None, "samples": 12.0, "total": 857.0},
              "total_is_partial": True,
              "skip_s": {"clip": 1.1, "prior": 0.9}, "this_run_s": 14.0,
              "stage_times_note": "copied from the first run"}
    cfg = ExperimentConfig(name="demo", model=None, data=DataConfig(name="captioned_shapes/r32"),
                           train=TrainConfig(steps=10, batch_size=4))
    md = demo.report_markdown(report, cfg)
    assert f"| CLIP score (100·max(cos, 0), mean) | {m['clip_score']:.2f} |" in md
    assert "| Fréchet distance to the prompts' renders (FD_CLIP) | 0.0000 |" in md
    assert "binding: two objects, both colour+shape) | 0.250 |" in md
    assert "(variations keep the judged objects, 5 renders × 4) | 0.000 |" in md
    assert "| clip | 845.0 | 1.1 |" in md and "| prior | — | 0.9 |" in md
    assert "| samples | 12.0 |  |" in md and "| this run | | 14.0 |" in md
    assert "Note: copied from the first run" in md
    assert "| zs_colour | 1.000 |" in md and "| probe_shape | 0.625 |" in md
    assert "| total | ≥ 857.0 (stages marked — unknown) |" in md


def test_overrides_are_routed_to_their_stage():
    got = demo.split_overrides(["decoder:train.steps=2000", "train.steps=5",
                                "upsampler:model.sample_steps=9", "clip:optim.b2=0.9"])
    assert got == {"clip": ["train.steps=5", "optim.b2=0.9"], "prior": [],
                   "decoder": ["train.steps=2000"], "upsampler": ["model.sample_steps=9"]}
    with pytest.raises(ValueError, match="names stage 'dalle'.*clip, prior, decoder, upsampler"):
        demo.split_overrides(["dalle:train.steps=1"])


def test_a_bad_stage_override_fails_before_anything_runs(tmp_path):
    with pytest.raises(KeyError, match="unknown config key 'train.stepz'"):
        demo.run(tmp_path, overrides=["decoder:train.stepz=10"])
    assert not (tmp_path / demo.TIMES_FILE).exists()


def test_report_states_the_recipe_each_stage_ran_with(tmp_path):
    from unclip_jax.core import config as config_lib
    from unclip_jax.models.decoder import DecoderConfig

    cfg = ExperimentConfig(name="d", task="decoder",
                           model=DecoderConfig(patch_size=2, timestep_sampling="logit_normal"),
                           train=TrainConfig(steps=9000, batch_size=32))
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "config.json").write_text(config_lib.to_json(cfg))
    got = demo.recipe(tmp_path)
    assert list(got) == ["decoder"]
    assert got["decoder"]["model.patch_size"] == 2
    assert got["decoder"]["train.steps"] == 9000
    assert got["decoder"]["model.timestep_sampling"] == "logit_normal"
    report = {"wall_s": {"decoder": 100.0, "total": 100.0}, "recipe": got,
              "backend": "cpu × 2 device(s)"}
    md = demo.report_markdown(report, ExperimentConfig(name="demo", model=None))
    assert "Ran on cpu × 2 device(s)." in md
    assert "| decoder | `train.steps=9000`, `train.batch_size=32`, `model.patch_size=2`," in md
    assert "`model.timestep_sampling='logit_normal'`" in md


def test_a_decoder_at_the_output_size_skips_the_upsampler_and_reads_its_own_cache():
    assert demo.needs_upsampler(32, 64)
    assert not demo.needs_upsampler(64, 64)
    assert demo.embeddings_dir_name("captioned_shapes/r32", "captioned_shapes/r32") == "embeddings"
    assert (demo.embeddings_dir_name("captioned_shapes/r64", "captioned_shapes/r32")
            == "embeddings_r64")
