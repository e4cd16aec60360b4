"""CLIP through the generic loop: sharded (data=2, fsdp=2, model=2) == single device."""

import jax
import numpy as np
import pytest

from unclip_jax.core import config as config_lib
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.models import clip
from unclip_jax.train import loop

TINY = clip.CLIPConfig(embed_dim=16, image_size=16, patch_size=4, vision_width=32,
                       vision_layers=2, vision_heads=4, vocab_size=64, context_length=8,
                       text_width=32, text_layers=2, text_heads=4, eos_id=2, pad_id=0)
BATCH = 16


def make_batch(i: int) -> dict:
    rng = np.random.default_rng(i)
    tokens = rng.integers(3, TINY.vocab_size, size=(BATCH, TINY.context_length))
    lengths = rng.integers(2, TINY.context_length, size=BATCH)
    for row, n in enumerate(lengths):
        tokens[row, 0], tokens[row, n] = 1, TINY.eos_id
        tokens[row, n + 1:] = TINY.pad_id
    images = rng.uniform(-1, 1, size=(BATCH, 16, 16, 3)).astype(np.float32)
    return {"image": images, "tokens": tokens.astype(np.int32)}


class Stream:
    def __init__(self, start):
        self.position = start

    def __next__(self):
        self.position += 1
        return make_batch(self.position - 1)


def make_task():
    model = clip.CLIP(TINY)
    return loop.Task(init=lambda rng, b: model.init(rng, b["image"], b["tokens"]),
                     loss=lambda p, b, rng: clip.loss_fn(model, p, b, rng),
                     batches=lambda start, mesh: Stream(start), example=make_batch(0))


def run(tmp_path, mesh: MeshConfig, steps=3):
    cfg = config_lib.ExperimentConfig(
        name="clip_tiny", model=TINY, mesh=mesh,
        optim=config_lib.OptimConfig(learning_rate=1e-3, warmup_steps=1),
        train=config_lib.TrainConfig(batch_size=BATCH, steps=steps, log_every=1, ckpt_every=0,
                                     ema_decay=0.5, async_checkpoint=False))
    return loop.train(cfg, make_task(), tmp_path, progress=False)


@pytest.fixture(scope="module")
def single_and_sharded(tmp_path_factory):
    single = run(tmp_path_factory.mktemp("single"), MeshConfig(data=1, fsdp=1, model=1))
    sharded = run(tmp_path_factory.mktemp("sharded"), MeshConfig(data=2, fsdp=2, model=2))
    return single, sharded


def test_sharded_train_steps_equal_single_device(single_and_sharded):
    single, sharded = single_and_sharded
    a, b = jax.device_get(single.params), jax.device_get(sharded.params)
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        # 1e-5 relative to the leaf's scale, floored at a typical weight scale (0.1): leaves
        # whose exact gradient is zero (e.g. key biases: softmax ignores a per-query shift)
        # hold only float noise (~1e-7), which no ordering of the reductions reproduces.
        scale = max(float(np.max(np.abs(x))), 0.1)
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    for x, y in zip(jax.tree.leaves(jax.device_get(single.ema_params)),
                    jax.tree.leaves(jax.device_get(sharded.ema_params)), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_params_are_really_sharded(single_and_sharded):
    _, sharded = single_and_sharded
    specs = {jax.tree_util.keystr(p): leaf.sharding.spec
             for p, leaf in jax.tree_util.tree_flatten_with_path(sharded.params)[0]}
    fsdp = [k for k, s in specs.items() if "fsdp" in str(s)]
    tp = [k for k, s in specs.items() if "model" in str(s)]
    assert fsdp and tp, specs
    # An FSDP×TP sharded 2-D kernel holds a quarter of its elements per device.
    for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.params)[0]:
        spec = leaf.sharding.spec
        if leaf.ndim == 2 and "fsdp" in str(spec) and "model" in str(spec):
            shard = leaf.addressable_shards[0].data
            assert shard.size * 4 == leaf.size
            break
    else:
        pytest.fail("no 2-D kernel sharded over both fsdp and model")
