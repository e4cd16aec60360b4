"""Test set-up: 8 fake CPU devices (set before JAX initialises) and the shared session fixtures:
one shapes tokenizer (``shapes_tokenizer``), one tiny CLIP with its initial params
(``tiny_clip_params``; the config is ``tiny.TINY_CLIP``) and one tiny captioned-shapes dataset
(``shapes_data``). Each is built once per test process and must not be modified by a test."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The tests compile hundreds of tiny programs and run each a few times, so XLA's backend
# optimisation passes cost more than they save (the three heaviest test files: 571 s → 437 s
# under the same load). The programs and their results are the same; benchmarks, the demo and
# every run outside the tests keep the full optimisation. UNCLIP_TEST_XLA_FAST_COMPILE=0 keeps
# it here too.
if (os.environ.get("UNCLIP_TEST_XLA_FAST_COMPILE", "1") != "0"
        and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]):
    os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                                " --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# One XLA compilation cache per test run, shared by the xdist workers: the tiny models' steps and
# samplers are compiled by many tests with the same shapes, and compiling is most of the suite's
# time. It starts empty (results never depend on an earlier run) and goes when the run ends
# (``pytest_sessionfinish``); a torn read between workers only warns and compiles again.
# UNCLIP_TEST_XLA_CACHE=0 turns it off; tests that count compiles also count cache hits.
if os.environ.get("UNCLIP_TEST_XLA_CACHE", "1") != "0":
    import tempfile

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    XLA_CACHE = os.path.join(tempfile.gettempdir(), f"unclip_jax_test_xla_cache_{run_id}")
    jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
else:
    XLA_CACHE = None


import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if XLA_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):    # the controller, at the end
        import shutil

        shutil.rmtree(XLA_CACHE, ignore_errors=True)

# The shared objects are built in the fixtures, so collecting a test that uses none of them
# imports no model (``tiny`` imports the CLIP, prior and decoder modules).


@pytest.fixture(scope="session")
def shapes_tokenizer(tmp_path_factory):
    """A sentencepiece tokenizer (vocabulary ``tiny.SHAPES_VOCAB``) trained on
    ``tiny.shapes_captions()``; its model file is ``.path``."""
    import tiny
    from unclip_jax.core.text import Tokenizer

    return Tokenizer.train(tiny.shapes_captions(), tmp_path_factory.mktemp("tokenizer")
                           / "shapes.model", tiny.SHAPES_VOCAB)


@pytest.fixture(scope="session")
def tiny_clip_params():
    """``(tiny.TINY_CLIP, params)``: the params ``CLIP.init`` draws with ``PRNGKey(0)``,
    unboxed (init jitted: one compile instead of one per operation)."""
    import flax.linen as nn
    import tiny
    from unclip_jax.models.clip import CLIP, dummy_inputs

    cfg = tiny.TINY_CLIP
    variables = jax.jit(CLIP(cfg).init)(jax.random.PRNGKey(0), *dummy_inputs(cfg, 1).values())
    return cfg, nn.meta.unbox(variables["params"])


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """The ``DataConfig`` of a captioned-shapes build of ``tiny.SHAPES_RES`` px with
    ``tiny.SHAPES_SIZES`` examples, read at that size with 12-token captions (no tokenizer)."""
    import tiny
    from unclip_jax.core.config import DataConfig
    from unclip_jax.data.captioned_shapes import build_captioned_shapes, dataset_name

    data_dir = build_captioned_shapes(tmp_path_factory.mktemp("shapes_data"),
                                      resolution=tiny.SHAPES_RES, **tiny.SHAPES_SIZES)
    return DataConfig(name=dataset_name(tiny.SHAPES_RES, **tiny.SHAPES_SIZES),
                      data_dir=str(data_dir), image_size=tiny.SHAPES_RES, context_length=12)
