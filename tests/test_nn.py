"""The shared building blocks: attention masks/context/precision/KV cache, scan, remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core.nn import MultiHeadAttention, Transformer, VisionTransformer, causal_mask

B, L, D, H = 2, 6, 32, 2


def _x(seed=0, shape=(B, L, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def _init(module, *args):
    return nn.meta.unbox(module.init(jax.random.key(1), *args))


def test_causal_mask():
    m = np.asarray(causal_mask(3))[0, 0]
    np.testing.assert_array_equal(m, [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_mask_blocks_masked_keys_only():
    attn = MultiHeadAttention(H)
    x = _x()
    mask = jnp.ones((1, 1, L, L), bool).at[..., 3].set(False)  # nobody sees key 3
    v = _init(attn, x, mask)
    apply = jax.jit(attn.apply)
    base = apply(v, x, mask)
    others = np.arange(L) != 3
    moved = apply(v, x.at[:, 3].add(5.0), mask)
    np.testing.assert_allclose(moved[:, others], base[:, others], atol=1e-6)
    moved = apply(v, x.at[:, 2].add(5.0), mask)  # key 2 is visible
    rest = np.arange(L) != 2
    assert np.abs(np.asarray(moved - base)[:, rest]).min(axis=-1).max() > 1e-3


def test_per_example_padding_mask():
    attn = MultiHeadAttention(H)
    x = _x()
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    mask = valid[:, None, None, :]
    v = _init(attn, x, mask)
    apply = jax.jit(attn.apply)
    base = apply(v, x, mask)
    moved = apply(v, x.at[:, 5].add(3.0), mask)
    np.testing.assert_allclose(moved[0, :5], base[0, :5], atol=1e-6)  # example 0: pad
    assert np.abs(np.asarray(moved[1, :5] - base[1, :5])).max() > 1e-3  # example 1: real


def test_context_is_attended_and_maskable():
    attn = MultiHeadAttention(H)
    x, ctx = _x(), _x(2, (B, 4, 24))  # context width may differ from D
    v = _init(attn, x, None, ctx)
    apply = jax.jit(attn.apply)
    assert "context_key" in v["params"] and "context_value" in v["params"]
    base = apply(v, x, None, ctx)
    assert np.abs(np.asarray(apply(v, x, None, ctx * 2.0) - base)).max() > 1e-3
    # A self-only mask keeps every context key visible ...
    self_mask = causal_mask(L)
    out = apply(v, x, self_mask, ctx)
    assert np.abs(np.asarray(apply(v, x, self_mask, ctx + 1.0) - out)).max() > 1e-3
    # ... and a full-width mask can hide them.
    hide = jnp.concatenate([jnp.ones((1, 1, L, L), bool), jnp.zeros((1, 1, L, 4), bool)], -1)
    no_ctx = apply(v, x, hide, ctx)
    np.testing.assert_allclose(apply(v, x, hide, ctx + 1.0), no_ctx, atol=1e-6)
    with pytest.raises(ValueError, match="mask key axis"):
        attn.apply(v, x, jnp.ones((1, 1, L, 3), bool), ctx)


def test_bfloat16_compute_keeps_float32_softmax():
    x = _x()
    v = _init(MultiHeadAttention(H), x, causal_mask(L))
    bf = MultiHeadAttention(H, dtype=jnp.bfloat16)
    out = bf.apply(v, x, causal_mask(L))
    assert out.dtype == jnp.bfloat16
    ref = MultiHeadAttention(H).apply(v, x, causal_mask(L))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2, rtol=5e-2)
    jaxpr = jax.make_jaxpr(lambda x: bf.apply(v, x, causal_mask(L)))(x)
    exps = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "exp"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)


def _transformer(**kw):
    return Transformer(width=D, depth=2, num_heads=H, act="quick_gelu", **kw)


def test_transformer_causal():
    model = _transformer(causal=True)
    x = _x()
    v = _init(model, x)
    apply = jax.jit(model.apply)
    base = apply(v, x)
    for t in range(L):
        moved = apply(v, x.at[:, t].add(2.0))
        np.testing.assert_allclose(moved[:, :t], base[:, :t], atol=1e-6)
        assert np.abs(np.asarray(moved[:, t:] - base[:, t:])).min(axis=-1).max() > 1e-4


def _stack_blocks(params, depth):
    blocks = [params[f"block_{i}"] for i in range(depth)]
    return {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def test_scan_equals_unrolled():
    x = _x()
    unrolled = _transformer(causal=True)
    v = _init(unrolled, x)
    scanned = _transformer(causal=True, scan_layers=True)
    vs = {"params": _stack_blocks(v["params"], 2)}
    shapes = jax.tree.map(jnp.shape, _init(scanned, x))
    assert jax.tree.map(jnp.shape, vs) == shapes
    np.testing.assert_allclose(scanned.apply(vs, x), unrolled.apply(v, x), atol=1e-5)


@pytest.mark.parametrize("scan,policy", [(False, "full"), (True, "dots_saveable")])
def test_remat_gradients_match(scan, policy):
    x = _x()
    plain = _transformer(causal=True, scan_layers=scan)
    v = _init(plain, x)

    def grad(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(model.apply(p, x)))))(v)

    g0, g1 = grad(plain), grad(_transformer(causal=True, scan_layers=scan, remat=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g0, g1)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 0


def test_unknown_remat_policy_is_an_error():
    with pytest.raises(ValueError, match="dots_saveable"):
        _init(_transformer(remat="bogus"), _x())


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_matches_full_recompute(scan):
    x, ctx = _x(3, (B, 8, D)), _x(4, (B, 3, 16))
    full = _transformer(causal=True, scan_layers=scan)
    params = _init(full, x, None, ctx)["params"]
    ref = full.apply({"params": params}, x, None, ctx)

    dec = _transformer(causal=True, scan_layers=scan, decode=True)
    cache = dec.init(jax.random.key(0), x, None, ctx)["cache"]
    cache = jax.tree.map(jnp.zeros_like, cache)
    step = jax.jit(lambda c, xt: dec.apply({"params": params, "cache": c}, xt, None, ctx,
                                          mutable=["cache"]))
    outs = []
    out, upd = step(cache, x[:, :3])  # prefill a 3-token prompt in one chunk
    outs.append(out)
    cache = upd["cache"]
    for t in range(3, 8):  # then one token at a time
        out, upd = step(cache, x[:, t:t + 1])
        outs.append(out)
        cache = upd["cache"]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), ref, atol=1e-5)


def test_vit_shapes_and_patch_locality():
    vit = VisionTransformer(patch_size=4, width=D, depth=1, num_heads=H, output_dim=16)
    img = jax.random.uniform(jax.random.key(0), (B, 16, 16, 3), minval=-1, maxval=1)
    v = _init(vit, img)
    tokens, feat = vit.apply(v, img)
    assert tokens.shape == (B, 17, D) and feat.shape == (B, 16)
    assert "bias" not in v["params"]["patch_embed"]
    assert not any("bias" in k for k in [*v["params"]]) and v["params"]["proj"].shape == (D, 16)
    with pytest.raises(ValueError, match="divisible"):
        vit.apply(v, img[:, :15, :15])


# ------------------------------------------------------------------ models on the transformer


def _stack_all_blocks(tree):
    """Every ``{block_0 … block_{n-1}}`` dict → ``{"blocks": stacked}`` (the scanned layout)."""
    if not isinstance(tree, dict):
        return tree
    n = sum(1 for k in tree if k.startswith("block_"))
    if n and all(f"block_{i}" in tree for i in range(n)):
        rest = {k: _stack_all_blocks(v) for k, v in tree.items() if not k.startswith("block_")}
        return {**rest, **_stack_blocks(tree, n)}
    return {k: _stack_all_blocks(v) for k, v in tree.items()}


def _model_case(name):
    """``(make(scan, remat) -> (init, loss), batch)`` for a tiny model of ``name``."""
    from unclip_jax.models import clip, dalle, prior, prior_ar

    r = np.random.default_rng(0)
    n = 4
    toks = r.integers(3, 30, (n, 6)).astype(np.int32)
    toks[:, 4:] *= np.array([[0], [1], [0], [1]], np.int32)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    if name == "prior":
        batch = {"image_emb": unit(r.normal(size=(n, 8))).astype(np.float32),
                 "text_emb": unit(r.normal(size=(n, 8))).astype(np.float32),
                 "text_states": r.normal(size=(n, 6, 16)).astype(np.float32),
                 "text_tokens": toks}

        def make(scan, remat):
            cfg = prior.PriorConfig(embed_dim=8, text_width=16, context_length=6, width=32,
                                    depth=2, num_heads=4, num_timesteps=50, scan_layers=scan,
                                    remat=remat)
            m = prior.DiffusionPrior(cfg)
            return (lambda k: m.init(k, jnp.zeros((n, 8)), jnp.zeros((n,), jnp.int32),
                                     prior.condition(cfg, batch)),
                    lambda p: prior.loss_fn(m, p, batch, jax.random.key(3))[0])
    elif name == "prior_ar":
        codes = r.integers(0, 16, (n, 7)).astype(np.int32)
        codes[:, 0] = 16
        batch = {"tokens": codes, "text_states": r.normal(size=(n, 6, 16)).astype(np.float32),
                 "text_tokens": toks, "text_emb": unit(r.normal(size=(n, 8))).astype(np.float32)}

        def make(scan, remat):
            cfg = prior_ar.ARPriorConfig(embed_dim=8, text_length=6, text_width=16, pca_dims=6,
                                         num_buckets=16, sim_buckets=4, width=32, depth=2,
                                         num_heads=4, scan_layers=scan, remat=remat)
            m = prior_ar.ARPrior(cfg)
            return (lambda k: m.init(k, batch["tokens"], prior_ar.cond_inputs(batch)),
                    lambda p: prior_ar.loss_fn(m, p, batch, jax.random.key(3))[0])
    elif name == "dalle":
        batch = {"text": toks, "image_tokens": r.integers(0, 32, (n, 4)).astype(np.int32)}

        def make(scan, remat):
            cfg = dalle.DalleConfig(text_vocab_size=32, image_vocab_size=32, text_length=6,
                                    grid_size=2, width=32, depth=2, num_heads=4,
                                    scan_layers=scan, remat=remat)
            m = dalle.DalleTransformer(cfg)
            seq = dalle.stream(cfg, batch["text"], batch["image_tokens"])[:, :-1]
            return (lambda k: m.init(k, seq),
                    lambda p: dalle.loss_fn(m, p, batch, jax.random.key(3))[0])
    else:
        toks[:, 0], toks[:, 5] = 1, 2
        batch = {"image": r.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32), "tokens": toks}

        def make(scan, remat):
            cfg = clip.CLIPConfig(embed_dim=8, image_size=8, patch_size=4, vision_width=32,
                                  vision_layers=2, vision_heads=4, vocab_size=32,
                                  context_length=6, text_width=32, text_layers=2, text_heads=4,
                                  eos_id=2, pad_id=0, scan_layers=scan, remat=remat)
            m = clip.CLIP(cfg)
            return (lambda k: m.init(k, batch["image"], batch["tokens"]),
                    lambda p: clip.loss_fn(m, p, batch, jax.random.key(3))[0])
    return make


@pytest.mark.parametrize("name", ["prior", "prior_ar", "dalle", "clip"])
def test_models_scan_and_remat_give_the_same_loss_and_gradients(name):
    """Per model: unrolled (reference) vs scanned + dots_saveable vs unrolled + full remat —
    same loss and gradients from the same weights (the scanned ones stacked)."""
    make = _model_case(name)
    init, loss = make(False, "none")
    params = nn.meta.unbox(init(jax.random.key(1)))["params"]
    l0, g0 = jax.jit(jax.value_and_grad(loss))(params)
    assert "blocks" not in str(jax.tree_util.tree_structure(params))
    checked = 0
    for scan, remat in ((True, "dots_saveable"), (False, "full")):
        init_v, loss_v = make(scan, remat)
        p = _stack_all_blocks(params) if scan else params
        shapes = jax.tree.map(jnp.shape, nn.meta.unbox(jax.eval_shape(init_v,
                                                                      jax.random.key(1))))
        assert jax.tree.map(jnp.shape, {"params": p}) == shapes, (name, scan)
        l1, g1 = jax.jit(jax.value_and_grad(loss_v))(p)
        np.testing.assert_allclose(l1, l0, rtol=1e-5, err_msg=f"{name} scan={scan} {remat}")
        ref = _stack_all_blocks(g0) if scan else g0
        # 1e-5 of the leaf's largest gradient, floored at 1e-3 of the largest gradient of the
        # model: leaves whose exact gradient is zero (attention key biases: softmax ignores a
        # per-query shift) hold only float noise, which no two programs reproduce.
        top = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0],
                                jax.tree.leaves(g1), strict=True):
            scale = max(float(jnp.abs(a).max()), 1e-3 * top)
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{name} scan={scan} {remat} "
                                               f"{jax.tree_util.keystr(path)}")
        checked += 1
    assert checked == 2 and max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 0
