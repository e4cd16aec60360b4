"""AR prior: PCA quantizer, similarity buckets, causality, cached decoding, sampling, training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.core import ar
from unclip_jax.data import input_pipeline
from unclip_jax.models import prior_ar as pa

E, L, W, K, NB = 16, 5, 8, 6, 32


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    scales = 0.9 ** np.arange(E)                       # decaying variance per direction
    basis = np.linalg.qr(rng.normal(size=(E, E)))[0]
    return _unit(rng.normal(size=(n, E)) * scales @ basis + 3.0 * basis[0]).astype(np.float32)


def test_pca_reconstruction_falls_with_dims_and_is_exact_with_all():
    x = _embeddings()
    errs = []
    for dims in (2, 4, 8, 12, E):
        q = pa.PCAQuantizer.fit(x, dims, NB)
        errs.append(np.mean(np.sum((q.reconstruct(q.project(x)) - x) ** 2, -1)))
        qerr = np.asarray(q.decode_coeffs(jnp.asarray(q.encode(x)))) - q.project(x)
        assert np.all(np.abs(qerr) <= 0.5 * np.diff(q.edges, axis=1).max(1) + 1e-5)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-10
    assert np.all(np.diff(q.variances) <= 0)


def test_quantization_error_is_closed_form_with_all_dims():
    x = _embeddings()
    q = pa.PCAQuantizer.fit(x, E, 4096)
    c = q.project(x)
    codes = q.encode(x)
    assert codes.min() >= 0 and codes.max() < 4096
    width = (q.edges[:, -1] - q.edges[:, 0]) / 4096
    centre = q.edges[:, 0] + (codes + 0.5) * width
    np.testing.assert_allclose(np.asarray(q.decode_coeffs(jnp.asarray(codes))), centre,
                               atol=1e-5)
    assert np.all(np.abs(c - centre) <= width / 2 + 1e-5)
    # Orthonormal components: the embedding error is exactly the coefficient error.
    rec = np.asarray(q.reconstruct(jnp.asarray(centre)))
    np.testing.assert_allclose(np.linalg.norm(rec - x, axis=-1),
                               np.linalg.norm(centre - c, axis=-1), atol=1e-5)
    # Coarse buckets are worse; decode() returns unit norm.
    coarse = pa.PCAQuantizer.fit(x, E, 8)
    def err(q):
        return np.mean(np.linalg.norm(np.asarray(q.decode(q.encode(x))) - x, axis=-1))

    assert err(q) < 0.1 * err(coarse)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q.decode(codes)), axis=-1), 1, atol=1e-5)


def test_quantile_buckets_are_equally_filled(tmp_path):
    x = _embeddings()
    q = pa.PCAQuantizer.fit(x, 4, 8, "quantile")
    counts = np.stack([np.bincount(c, minlength=8) for c in q.encode(x).T])
    assert np.all(np.abs(counts - len(x) / 8) <= 2)
    sim = pa.SimilarityBuckets.fit(np.linspace(-1, 1, 101), 4)
    pa.save_quantizers(tmp_path / "q.npz", q, sim)
    q2, sim2 = pa.load_quantizers(tmp_path / "q.npz")
    np.testing.assert_array_equal(q2.edges, q.edges)
    np.testing.assert_array_equal(sim2.edges, sim.edges)
    with pytest.raises(ValueError, match="accepted"):
        pa.PCAQuantizer.fit(x, 4, 8, "log")


def test_similarity_buckets():
    sims = np.random.default_rng(0).normal(0.3, 0.05, 4000)
    sb = pa.SimilarityBuckets.fit(sims, 8)
    np.testing.assert_array_equal(np.bincount(sb.encode(sims), minlength=8), [500] * 8)
    assert sb.at_percentile(50) == 4 and sb.at_percentile(49) == 3
    assert sb.at_percentile(0) == 0 and sb.at_percentile(100) == 7
    assert sb.encode(np.array([-5.0, 5.0])).tolist() == [0, 7]
    data = {"text_emb": _unit(np.ones((2, 3))), "image_emb": _unit(np.array([[1, 1, 1.],
                                                                             [1, 0, 0]]))}
    np.testing.assert_allclose(pa.similarities(data), [1.0, 3 ** -0.5], rtol=1e-6)


# ----------------------------------------------------------------------------- model

CFG = pa.ARPriorConfig(embed_dim=E, text_length=L, text_width=W, pca_dims=K, num_buckets=NB,
                       sim_buckets=4, width=32, depth=2, num_heads=2, caption_dropout=0.2)


def _batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    text_tokens = rng.integers(1, 50, (b, L)).astype(np.int32)
    text_tokens[:, 3:] = 0                                       # padding
    return {"tokens": np.concatenate([NB + rng.integers(0, 4, (b, 1)),
                                      rng.integers(0, NB, (b, K))], 1).astype(np.int32),
            "text_states": rng.normal(size=(b, L, W)).astype(np.float16),
            "text_tokens": text_tokens,
            "text_emb": _unit(rng.normal(size=(b, E))).astype(np.float32)}


@pytest.fixture(scope="module")
def params():
    b = _batch()

    @jax.jit
    def init(rng, tokens, cond):
        p = pa.ARPrior(CFG).init(rng, tokens, cond)["params"]
        # The head starts at zero; perturb every weight so the logits are informative.
        return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(rng, x.shape), p)

    return init(jax.random.PRNGKey(0), b["tokens"], pa.cond_inputs(b))


@jax.jit
def _logits(params, batch, keep=None):
    return pa.ARPrior(CFG).apply({"params": params}, batch["tokens"], pa.cond_inputs(batch, keep))


def test_causal_and_padding_masked(params):
    b = _batch()
    base = np.asarray(_logits(params, b))
    assert base.shape == (4, K + 1, NB)
    j = 3
    changed = dict(b, tokens=b["tokens"].copy())
    changed["tokens"][:, j] = (changed["tokens"][:, j] + 7) % NB
    out = np.asarray(_logits(params, changed))
    np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-5)   # the past is unchanged
    assert np.abs(out[:, j:] - base[:, j:]).max() > 1e-3            # the future is not
    states = b["text_states"].copy()
    states[:, 3:] = 100.0                                           # padded states are masked
    np.testing.assert_allclose(_logits(params, dict(b, text_states=states)), base, atol=1e-5)
    states = b["text_states"].copy()
    states[:, 0] += 1.0                                             # real states matter
    assert np.abs(_logits(params, dict(b, text_states=states)) - base).max() > 1e-3
    dropped = np.asarray(_logits(params, b, jnp.zeros(4, bool)))    # dropping the caption …
    assert np.abs(dropped - base).max() > 1e-3
    other = dict(b, text_states=-b["text_states"], text_emb=-b["text_emb"])
    np.testing.assert_allclose(_logits(params, other, jnp.zeros(4, bool)), dropped, atol=1e-5)


def test_cached_decoding_equals_full_recompute(params):
    b = _batch(seed=1)
    module = pa.ARPrior(CFG, decode=True)
    model = ar.linen_model(module, lambda n: (jnp.zeros((n, K + 1), jnp.int32),
                                              pa.cond_inputs(pa.dummy_inputs(CFG, n))))
    cond = {k: jnp.asarray(v) for k, v in pa.cond_inputs(b).items()}
    codes, logits = ar.generate(model, params, jnp.asarray(b["tokens"][:, :1]),
                                jax.random.PRNGKey(0), num_tokens=K, cond=cond,
                                return_logits=True)
    full = _logits(params, dict(b, tokens=jnp.concatenate([b["tokens"][:, :1], codes], 1)))
    np.testing.assert_allclose(logits, full[:, :K], atol=1e-5)


def test_sampled_embeddings_are_unit_norm(params):
    x = _embeddings(500)
    pca = pa.PCAQuantizer.fit(x, K, NB)
    sim = pa.SimilarityBuckets.fit(np.linspace(0, 1, 50), 4)
    b = _batch(3)
    sample = pa.make_sampler(CFG, pca, sim, guidance_scale=2.0, top_p=0.9)
    inputs = {k: b[k] for k in ("text_emb", "text_states", "text_tokens")}
    emb = np.asarray(sample(params, inputs, jax.random.PRNGKey(0)))
    assert emb.shape == (3, E)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="caption_dropout"):
        pa.make_sampler(dataclasses.replace(CFG, caption_dropout=0.0), pca, sim,
                        guidance_scale=2.0)


def test_short_training_reduces_loss():
    """Image codes that are a function of the caption: the loss must fall well below log(nb)."""
    rng = np.random.default_rng(0)
    n = 256
    text_emb = _unit(rng.normal(size=(n, E))).astype(np.float32)
    image_emb = _unit(text_emb + 0.1 * rng.normal(size=(n, E))).astype(np.float32)
    data = {"text_emb": text_emb, "image_emb": image_emb,
            "text_states": np.repeat(text_emb[:, None, :W], L, 1).astype(np.float16),
            "text_tokens": np.ones((n, L), np.int32)}
    cfg = dataclasses.replace(CFG, num_buckets=16)
    pca = pa.PCAQuantizer.fit(image_emb, K, 16)
    sim = pa.SimilarityBuckets.fit(pa.similarities(data), 4)
    arrays = pa.model_arrays(data, pca, sim)
    model = pa.ARPrior(cfg)
    batches = input_pipeline.EmbeddingBatches(arrays, 64, seed=0)
    again = input_pipeline.EmbeddingBatches(arrays, 64, seed=0)
    np.testing.assert_array_equal(batches.batch(5)["tokens"], again.batch(5)["tokens"])
    params = jax.jit(model.init)(jax.random.PRNGKey(0), arrays["tokens"][:2],
                        pa.cond_inputs({k: v[:2] for k, v in arrays.items()}))["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, key):
        (loss, _), g = jax.value_and_grad(pa.loss_fn, argnums=1, has_aux=True)(
            model, params, batch, key)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(60):
        params, opt, loss = step(params, opt, next(batches), jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert abs(losses[0] - np.log(16)) < 0.05          # zero head: uniform at the start
    assert np.mean(losses[-10:]) < losses[0] - 0.4, losses[::10]


def test_num_candidates_keeps_the_draw_nearest_the_text(params):
    """k = 3 equals drawing the 3·B batch once and keeping, per caption, the draw with the
    highest dot product with its text embedding; bad k is refused."""
    pca = pa.PCAQuantizer.fit(_embeddings(500), K, NB)
    sim = pa.SimilarityBuckets.fit(np.linspace(0, 1, 50), 4)
    b = _batch(2, seed=3)
    inputs = {k: b[k] for k in ("text_emb", "text_states", "text_tokens")}
    rng = jax.random.PRNGKey(5)
    got = np.asarray(pa.make_sampler(CFG, pca, sim, num_candidates=3)(params, inputs, rng))
    tiled = {k: np.concatenate([v] * 3) for k, v in inputs.items()}
    draws = np.asarray(pa.make_sampler(CFG, pca, sim)(params, tiled, rng)).reshape(3, 2, E)
    assert not np.allclose(draws[0], draws[1])                     # the draws differ
    best = np.argmax(np.einsum("kbe,be->kb", draws, b["text_emb"]), axis=0)
    np.testing.assert_allclose(got, draws[best, np.arange(2)], atol=1e-6)
    with pytest.raises(ValueError, match="num_candidates must be ≥ 1"):
        pa.make_sampler(CFG, pca, sim, num_candidates=0)
