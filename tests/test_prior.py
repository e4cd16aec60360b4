"""The diffusion prior: causality, guidance nulls, drop rate, x₀ target/scale, rerank, training."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core import diffusion
from unclip_jax.models import prior as P
from unclip_jax.models import sampling as S
from unclip_jax.train import runs
from unclip_jax.train.tasks import prior as prior_tasks

E, W, L, B = 8, 12, 6, 4
CFG = P.PriorConfig(embed_dim=E, text_width=W, context_length=L, width=16, depth=2,
                    num_heads=2, sample_steps=4, num_candidates=2)


def _inputs(rng, b=B):
    k1, k2, k3 = jax.random.split(rng, 3)
    emb = jax.random.normal(k1, (b, E))
    tokens = np.array([[1, 5, 6, 3, 0, 0]] * b, np.int32)
    return {"text_emb": emb / jnp.linalg.norm(emb, axis=-1, keepdims=True),
            "text_states": jax.random.normal(k2, (b, L, W)),
            "text_tokens": tokens,
            "image_emb": jax.random.normal(k3, (b, E))}


@pytest.fixture(scope="module")
def setup():
    model = P.DiffusionPrior(CFG)
    inp = _inputs(jax.random.PRNGKey(0))
    cond = P.condition(CFG, inp)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, E))
    t = jnp.array([3, 500, 999, 0])
    params = model.init(jax.random.PRNGKey(2), x, t, cond)["params"]
    params = nn.meta.unbox(params)
    return model, params, inp, cond, x, t


def test_causal_later_tokens_never_change_earlier_positions(setup):
    model, params, inp, cond, x, t = setup
    seq = lambda x_, t_, c_: model.apply({"params": params}, x_, t_, c_,  # noqa: E731
                                         return_sequence=True)
    base = seq(x, t, cond)
    assert base.shape == (B, L + 4, CFG.width)
    # The noised embedding sits at position L + 2: positions ≤ L + 1 must not move.
    moved = seq(x + 5.0, t, cond)
    np.testing.assert_allclose(moved[:, :L + 2], base[:, :L + 2], atol=1e-6)
    assert np.abs(moved[:, L + 2:] - base[:, L + 2:]).max() > 1e-3
    # The timestep (position L + 1) never changes the text positions.
    moved = seq(x, t + 7, cond)
    np.testing.assert_allclose(moved[:, :L + 1], base[:, :L + 1], atol=1e-6)
    assert np.abs(moved[:, L + 1:] - base[:, L + 1:]).max() > 1e-3
    # A later text token never changes an earlier one.
    states = cond["text_states"].at[:, 2].add(3.0)
    moved = seq(x, t, dict(cond, text_states=states))
    np.testing.assert_allclose(moved[:, :2], base[:, :2], atol=1e-6)
    assert np.abs(moved[:, 2:] - base[:, 2:]).max() > 1e-3


def test_padding_tokens_are_masked_out(setup):
    model, params, inp, cond, x, t = setup
    out = model.apply({"params": params}, x, t, cond)
    pad = cond["text_states"].at[:, 4:].set(100.0)      # tokens 4, 5 are pad (id 0)
    np.testing.assert_allclose(model.apply({"params": params}, x, t, dict(cond, text_states=pad)),
                               out, atol=1e-5)


def test_unconditional_branch_keeps_noised_token_and_timestep(setup):
    model, params, inp, cond, x, t = setup
    unc = P.uncondition(params, CFG, cond)
    assert set(unc) == set(cond)                         # the nulls replace only conditioning
    np.testing.assert_array_equal(unc["text_mask"], np.ones((B, L), bool))
    f = lambda x_, t_, c_: model.apply({"params": params}, x_, t_, c_)  # noqa: E731
    # The bug this catches: a null that also replaces the noised embedding (or the timestep)
    # makes the unconditional output independent of x_t (or t).
    assert np.abs(f(x, t, unc) - f(-x, t, unc)).max() > 1e-3
    assert np.abs(f(x, t, unc) - f(x, t + 100, unc)).max() > 1e-3
    # The uncond differs from the cond in the conditioning only.
    assert np.abs(f(x, t, unc) - f(x, t, cond)).max() > 1e-3

    # In training, dropped rows reach the denoiser with the real x_t and t.
    seen = {}

    def spy(p, x_t, t_, c):
        seen.update(x_t=x_t, t=t_, c=c)
        return model.apply({"params": p}, x_t, t_, c)

    cfg = dataclasses.replace(CFG, cond_drop_prob=1.0)
    P.loss_fn(P.DiffusionPrior(cfg), params, inp, jax.random.PRNGKey(5), denoiser=spy)
    rng_t, rng_n, _ = jax.random.split(jax.random.PRNGKey(5), 3)
    sched = P.base_schedule(cfg)
    i = diffusion.sample_timesteps(rng_t, B, sched.num_steps)
    x_t = diffusion.q_sample(sched, P.to_model_space(cfg, inp["image_emb"]), i,
                             jax.random.normal(rng_n, (B, E)))
    np.testing.assert_allclose(seen["x_t"], x_t, atol=1e-5)
    np.testing.assert_array_equal(seen["t"], i)
    np.testing.assert_allclose(seen["c"]["text_emb"],
                               np.broadcast_to(params["null_text_emb"], (B, E)))


def test_null_drop_rate_is_ten_percent(setup):
    model, params, inp, cond, x, t = setup
    n = 4000
    big = {k: np.repeat(np.asarray(v), n // B, axis=0) for k, v in inp.items()}
    seen = {}

    def spy(p, x_t, t_, c):
        seen["c"] = c
        return jnp.zeros_like(x_t)

    P.loss_fn(model, params, big, jax.random.PRNGKey(9), denoiser=spy)
    dropped_emb = np.all(np.asarray(seen["c"]["text_emb"]) == np.asarray(params["null_text_emb"]),
                         axis=-1)
    dropped_states = np.all(np.asarray(seen["c"]["text_states"])
                            == np.asarray(params["null_text_states"]), axis=(1, 2))
    np.testing.assert_array_equal(dropped_emb, dropped_states)   # tokens + embedding together
    assert 0.085 < dropped_emb.mean() < 0.115, dropped_emb.mean()


@pytest.mark.parametrize("norm", ["scale", "standardize"])
def test_x0_target_and_scale_round_trip(setup, norm):
    model, params, inp, cond, x, t = setup
    rng = np.random.default_rng(0)
    cfg = dataclasses.replace(CFG, normalization=norm,
                              embed_mean=tuple(rng.normal(size=E) * 0.1),
                              embed_std=tuple(rng.uniform(0.1, 0.3, size=E)))
    emb = np.asarray(inp["image_emb"])
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    z = P.to_model_space(cfg, emb)
    np.testing.assert_allclose(P.from_model_space(cfg, z), emb, atol=1e-5)
    np.testing.assert_allclose(P.from_model_space(cfg, z * 1.0, renormalize=True), emb,
                               atol=1e-5)
    if norm == "scale":
        assert P.resolved_scale(cfg) == pytest.approx(0.54 * np.sqrt(E))
        np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 0.54 * np.sqrt(E), rtol=1e-5)
    # The target is x₀ in model space: a denoiser returning it has zero loss, ε does not.
    batch = dict(inp, image_emb=emb)
    oracle = lambda p, x_t, t_, c: z  # noqa: E731
    loss, _ = P.loss_fn(P.DiffusionPrior(cfg), params, batch, jax.random.PRNGKey(0),
                        denoiser=oracle)
    assert float(loss) < 1e-10
    unscaled = lambda p, x_t, t_, c: jnp.asarray(emb)  # noqa: E731
    loss, _ = P.loss_fn(P.DiffusionPrior(cfg), params, batch, jax.random.PRNGKey(0),
                        denoiser=unscaled)
    assert float(loss) > 1e-3


def test_rerank_picks_max_dot_product():
    rng = np.random.default_rng(0)
    cand = rng.normal(size=(3, 5, E)).astype(np.float32)
    text = rng.normal(size=(5, E)).astype(np.float32)
    got = np.asarray(P.rerank(cand, text))
    best = np.argmax(np.einsum("kbe,be->kb", cand, text), axis=0)
    np.testing.assert_array_equal(got, cand[best, np.arange(5)])
    assert len(set(best.tolist())) > 1       # the choice really varies per caption


def test_sampler_shapes_unit_norm_and_candidates(setup):
    model, params, inp, cond, x, t = setup
    s = S.PriorSampler(model, params, num_candidates=3, guidance_scale=2.0)
    out = s(inp, jax.random.PRNGKey(0))
    assert out.shape == (B, E)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    s(inp, jax.random.PRNGKey(1), guidance_scale=3.0)          # traced: no recompile
    assert s.sampler(3 * B, True).jitted._cache_size() == 1


@pytest.mark.slow
def test_load_sampler_from_a_trained_run(tmp_path):
    """A short real training run on synthetic embeddings: the loss falls, and the workdir's
    ``runs.load_prior`` returns ``[B, E]`` embeddings."""
    from unclip_jax.core.config import ExperimentConfig, OptimConfig, TrainConfig
    from unclip_jax.core.sharding import MeshConfig
    from unclip_jax.train import embeddings, loop

    # Synthetic cache: the image embedding is a fixed linear map of the text embedding.
    rng = np.random.default_rng(0)
    n = 256
    text = rng.normal(size=(n, E)).astype(np.float32)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    img = text @ rng.normal(size=(E, E)).astype(np.float32)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    arrays = {"text_emb": text, "image_emb": img,
              "text_tokens": np.tile(np.array([[1, 5, 6, 3, 0, 0]], np.int32), (n, 1)),
              "text_states": rng.normal(size=(n, L, W)).astype(np.float16),
              "index": np.arange(n, dtype=np.int64)}
    cache = tmp_path / "cache"
    for split in ("train", "validation"):
        (cache / split).mkdir(parents=True)
        np.savez(cache / split / "shard_00000.npz", **arrays)
    (cache / "meta.json").write_text(json.dumps({
        "clip_workdir": str(tmp_path / "no_clip"), "clip_step": 0, "embed_dim": E,
        "context_length": L, "text_width": W, "pad_id": 0, "shard_size": n,
        "splits": {s: {"count": n, "num_shards": 1} for s in ("train", "validation")}}))
    assert embeddings.load_split(cache, "train")["text_emb"].shape == (n, E)

    cfg = ExperimentConfig(
        name="t", task="prior",
        model=dataclasses.replace(CFG, width=32, embeddings_dir=str(cache)),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=5, weight_decay=0.0),
        train=TrainConfig(batch_size=32, steps=40, log_every=10, eval_every=0,
                          ckpt_every=40, async_checkpoint=False),
        mesh=MeshConfig(data=1, fsdp=1, model=1))
    cfg, task = prior_tasks.prior_task(cfg, tmp_path / "run")
    assert cfg.model.embed_scale == pytest.approx(0.54 * np.sqrt(E))
    assert int(next(task.batches(3, None))["text_emb"].shape[0]) == 32
    np.testing.assert_array_equal(task.batches(3, None).batch(3)["text_emb"],
                                  task.batches(0, None).batch(3)["text_emb"])   # pure in i
    loop.train(cfg, task, tmp_path / "run", progress=False)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.6 * losses[0], losses

    sampler = runs.load_prior(tmp_path / "run", sample_steps=4)
    out = sampler({k: arrays[k][:5] for k in ("text_emb", "text_states", "text_tokens")},
                  jax.random.PRNGKey(0))
    assert out.shape == (5, E)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
