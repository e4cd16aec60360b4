"""DALL·E transformer: masks, per-position padding, loss weights, KV-cached sampling, rerank."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import dalle

L, G, VT, K = 4, 3, 11, 7          # text length, grid, text vocab, image vocab
TEXT = np.array([[2, 5, 3, 0], [2, 7, 8, 3]], np.int32)


def _cfg(**kw):
    base = dict(text_vocab_size=VT, image_vocab_size=K, text_length=L, grid_size=G, width=16,
                depth=1, num_heads=2)
    return dalle.DalleConfig(**{**base, **kw})


def _params(cfg, seed=0):
    """Initialised params, perturbed so the zero-initialised head gives non-trivial logits."""
    b = dalle.dummy_inputs(cfg, 1)
    params = jax.jit(dalle.DalleTransformer(cfg).init)(
        jax.random.PRNGKey(seed), dalle.stream(cfg, b["text"], b["image_tokens"])[:, :-1])
    leaves, tree = jax.tree.flatten(nn.meta.unbox(params["params"]))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


# ----------------------------------------------------------------------------- masks


def _reference_mask(kind, text_len, g, kernel=3):
    """Direct double loop over (query, key) with each pattern's rule in grid coordinates."""
    t = text_len + g * g
    m = np.zeros((t, t), bool)
    a = kernel // 2
    for q, k in itertools.product(range(t), range(t)):
        if k > q:
            continue                                   # causal
        if k < text_len:
            m[q, k] = True                             # text keys: always visible
            continue
        if q < text_len:
            continue
        (rq, cq), (rk, ck) = divmod(q - text_len, g), divmod(k - text_len, g)
        if kind == "full":
            m[q, k] = True
        elif kind == "row":                             # previous g+1 tokens in raster order
            m[q, k] = (rq * g + cq) - (rk * g + ck) <= g
        elif kind == "column":
            m[q, k] = cq == ck
        elif kind == "conv":                            # causal k×k window, raster wraparound
            m[q, k] = any((rq + dr) * g + (cq + dc) == rk * g + ck
                          for dr in range(-a, 1) for dc in range(-a, a + 1)
                          if dr < 0 or dc <= 0)
    return m


@pytest.mark.parametrize("kind,kernel", [("full", 3), ("row", 3), ("column", 3), ("conv", 3),
                                         ("conv", 5)])
def test_masks_match_independent_construction_and_are_causal(kind, kernel):
    g = 4
    m = dalle.attention_mask(kind, 3, g, kernel)
    np.testing.assert_array_equal(m, _reference_mask(kind, 3, g, kernel))
    assert not np.triu(m, 1).any()                     # no query sees a later key
    assert m[:, :3][np.tril(np.ones_like(m[:, :3]))].all()   # text keys seen by all later
    assert np.diag(m).all()


def test_sparse_masks_are_sparser_than_full():
    full = dalle.attention_mask("full", 2, 4)
    for kind in ("row", "column", "conv"):
        m = dalle.attention_mask(kind, 2, 4)
        assert (m <= full).all() and m.sum() < full.sum()


def test_layer_kinds():
    assert dalle.layer_kinds(_cfg(depth=5, attention="paper")) == (
        "row", "column", "row", "row", "conv")
    assert dalle.layer_kinds(_cfg(depth=2, attention="row,conv")) == ("row", "conv")
    with pytest.raises(ValueError, match="comma-separated list of 2"):
        dalle.layer_kinds(_cfg(depth=2, attention="row,conv,full"))
    with pytest.raises(ValueError, match="unknown|one of"):
        dalle.layer_kinds(_cfg(depth=1, attention="diagonal"))


# ----------------------------------------------------------------------------- embeddings


def test_per_position_padding_tokens():
    cfg = _cfg()
    params = _params(cfg)
    model = dalle.DalleTransformer(cfg)

    run = jax.jit(lambda t, k: model.apply({"params": params}, t, {"keep": k},
                                           method=_embed_only))

    def embed(tokens, keep=(True,)):
        return np.asarray(run(jnp.asarray(tokens), jnp.asarray(keep)))

    a = embed([[2, 5, 3, 0]])                   # pad at position 3
    b = embed([[2, 3, 0, 0]])                   # pads at positions 2 and 3
    np.testing.assert_array_equal(a[0, 0], b[0, 0])      # same BOS at the same position
    np.testing.assert_array_equal(a[0, 3], b[0, 3])      # same pad at the same position
    assert not np.allclose(b[0, 2], b[0, 3])             # pads differ by position
    assert not np.allclose(a[0, 2], b[0, 2])             # EOS ≠ pad at position 2
    pad_rows = params["text_padding_embedding"] + params["text_position_embedding"]
    np.testing.assert_allclose(b[0, 2:], pad_rows[2:], rtol=1e-6)
    dropped = embed([[2, 5, 3, 0]], [False])             # dropped caption: all padding
    np.testing.assert_allclose(dropped[0], pad_rows, rtol=1e-6)


def _embed_only(module, tokens, cond=None):
    """Run the module but return the embedding output (via a sown copy)."""
    captured = {}

    def grab(next_fun, args, kwargs, context):
        if context.module.name == "layers_0" and context.method_name == "__call__":
            captured["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        module(tokens, cond)
    return captured["x"]


# ----------------------------------------------------------------------------- loss


def test_loss_weights_and_counted_positions_by_hand():
    cfg = _cfg(caption_dropout=0.5)
    params = _params(cfg)
    model = dalle.DalleTransformer(cfg)
    image = np.array([[1, 2, 3, 4, 5, 6, 0, 1, 2], [6, 5, 4, 3, 2, 1, 0, 6, 5]], np.int32)
    batch = {"text": jnp.asarray(TEXT), "image_tokens": jnp.asarray(image)}
    seq = np.concatenate([TEXT, image + VT], 1)
    apply = jax.jit(lambda s, k: model.apply({"params": params}, s, {"keep": k}))
    logits = np.asarray(apply(jnp.asarray(seq[:, :-1]), jnp.ones((2,), bool)))
    logp = np.asarray(jax.nn.log_softmax(logits))

    def nll(b, t):            # row t predicts stream position t + 1
        return -logp[b, t, seq[b, t + 1]]

    # text targets: positions 1..3 of row 0 are (5, EOS, pad) → pad excluded; row 1 all real
    text_terms = [nll(0, 0), nll(0, 1), nll(1, 0), nll(1, 1), nll(1, 2)]
    image_terms = [nll(b, t) for b in range(2) for t in range(L - 1, L - 1 + G * G)]
    want = np.mean(text_terms) / 8 + 7 * np.mean(image_terms) / 8
    loss_fn = jax.jit(lambda b, r: dalle.loss_fn(model, params, b, r))
    loss, m = jax.jit(lambda b: dalle.loss_fn(model, params, b))(batch)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["text_loss"], np.mean(text_terms), rtol=1e-5)
    np.testing.assert_allclose(m["image_loss"], np.mean(image_terms), rtol=1e-5)
    # the logits exclude the wrong vocabulary: text rows never score image ids and vice versa
    assert (logits[:, :L - 1, VT:] <= -1e29).all() and (logits[:, L - 1:, :VT] <= -1e29).all()

    # caption dropout: dropped rows contribute no text targets (a key dropping exactly row 0)
    for seed in range(100):
        rng = jax.random.PRNGKey(seed)
        keep = np.asarray(jax.random.uniform(rng, (2,)) >= 0.5)
        if keep.tolist() == [False, True]:
            break
    logits_d = apply(jnp.asarray(seq[:, :-1]), jnp.asarray(keep))
    logp_d = np.asarray(jax.nn.log_softmax(logits_d))
    text_d = [-logp_d[1, t, seq[1, t + 1]] for t in range(3)]
    image_d = [-logp_d[b, t, seq[b, t + 1]] for b in range(2) for t in range(L - 1, L + 8)]
    loss_d, m_d = loss_fn(batch, rng)
    np.testing.assert_allclose(m_d["text_loss"], np.mean(text_d), rtol=1e-5)
    np.testing.assert_allclose(loss_d, np.mean(text_d) / 8 + 7 * np.mean(image_d) / 8,
                               rtol=1e-5)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("attention,depth", [("full", 1), ("row,column,conv", 3)])
def test_kv_cached_sampling_equals_full_recomputation(attention, depth):
    cfg = _cfg(attention=attention, depth=depth)
    params = _params(cfg)
    text, rng = jnp.asarray(TEXT), jax.random.PRNGKey(3)
    codes, logits = dalle.sample(cfg, params, text, rng, temperature=0.0, return_logits=True)
    ref_codes, ref_logits = dalle.sample_uncached(cfg, params, text, rng, temperature=0.0,
                                                  return_logits=True)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    assert codes.shape == (2, G, G)
    assert (np.asarray(codes) >= 0).all() and (np.asarray(codes) < K).all()
    # sampling at temperature 1 also stays in the image vocabulary and matches the reference
    drawn, _ = dalle.sample(cfg, params, text, rng, temperature=1.0, return_logits=True)
    ref_drawn, _ = dalle.sample_uncached(cfg, params, text, rng, temperature=1.0,
                                         return_logits=True)
    np.testing.assert_array_equal(drawn, ref_drawn)
    assert (np.asarray(drawn) >= 0).all() and (np.asarray(drawn) < K).all()


def test_guidance_scale_one_is_conditional_only():
    cfg = _cfg()
    params = _params(cfg)
    text, rng = jnp.asarray(TEXT), jax.random.PRNGKey(5)
    plain, lp = dalle.sample(cfg, params, text, rng, temperature=0.0, return_logits=True)
    guided, lg = dalle.sample(cfg, params, text, rng, temperature=0.0, guided=True,
                              guidance_scale=1.0, return_logits=True)
    np.testing.assert_array_equal(plain, guided)
    np.testing.assert_allclose(lp, lg, atol=1e-5)
    _, l0 = dalle.sample(cfg, params, text, rng, temperature=0.0, guided=True,
                         guidance_scale=0.0, return_logits=True)
    assert not np.allclose(l0, lp, atol=1e-3)          # scale 0 is the unconditional stream


# ----------------------------------------------------------------------------- rerank


@pytest.mark.slow
def test_rerank_sorts_candidates_by_clip_score():
    from unclip_jax.models import dvae as dvae_lib
    from tiny import TINY_CLIP
    from unclip_jax.models.clip import CLIP
    from unclip_jax.pipelines.dalle import DallePipeline

    cfg = _cfg()
    params = _params(cfg)
    dcfg = dvae_lib.DVAEConfig(image_size=6, num_groups=2, blocks_per_group=1, encoder_width=4,
                               decoder_width=4, decoder_init_width=4, vocab_size=K)
    dvae_model = dvae_lib.DVAE(dcfg)
    dvae_params = nn.meta.unbox(jax.jit(dvae_model.init)(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 6, 6, 3)))["params"])
    ccfg = dataclasses.replace(TINY_CLIP, vocab_size=16, context_length=6, eos_id=2)
    clip_model = CLIP(ccfg)
    clip_params = nn.meta.unbox(jax.jit(clip_model.init)(
        jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 6), jnp.int32))["params"])
    pipe = DallePipeline(cfg, dvae_model, clip_model)
    clip_tokens = jnp.array([[2, 4, 5, 3, 0, 0], [2, 6, 3, 0, 0, 0]])
    out = pipe.rerank_fn(params, dvae_params, clip_params, jnp.asarray(TEXT), clip_tokens,
                         jax.random.PRNGKey(7), 1.0, 1.0, 0, 1.0, num_candidates=5,
                         guided=False)
    scores = np.asarray(out.scores)
    assert out.images.shape == (2, 5, 6, 6, 3) and scores.shape == (2, 5)
    assert (np.diff(scores, axis=1) <= 0).all()                    # best first
    assert sorted(np.asarray(out.order)[0].tolist()) == list(range(5))
    # each score is 100·cos of *its* image (resized to the CLIP's 8 px) and caption, and the
    # images are the dVAE decodes of the returned codes
    @jax.jit
    def check(images, codes):
        img = clip_model.apply({"params": clip_params}, jax.image.resize(
            images.reshape(10, 6, 6, 3), (10, 8, 8, 3), "bilinear", antialias=True),
            method=CLIP.encode_image).reshape(2, 5, -1)
        txt = clip_model.apply({"params": clip_params}, clip_tokens, method=CLIP.encode_text)
        return (100 * jnp.einsum("bne,be->bn", img, txt),
                dvae_lib.decode(dvae_model, dvae_params, codes.reshape(10, G, G)))

    want_scores, decoded = check(out.images, out.codes)
    np.testing.assert_allclose(scores, want_scores, atol=1e-3)
    np.testing.assert_allclose(out.images.reshape(10, 6, 6, 3), decoded, atol=1e-5)
