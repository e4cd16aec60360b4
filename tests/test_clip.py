"""CLIP: EOS pooling, causality, temperature, the global-batch loss (sharded), zero-shot."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.core import sharding
from unclip_jax.train.eval import zero_shot
from unclip_jax.models.clip import (CLIP, CLIPConfig, contrastive_loss, dummy_inputs,
                                    eos_positions, loss_fn)

TINY = CLIPConfig(embed_dim=16, image_size=16, patch_size=4, vision_width=32, vision_layers=2,
                  vision_heads=2, vocab_size=64, context_length=8, text_width=32,
                  text_layers=2, text_heads=2)
BOS, EOS = 1, TINY.eos_id


@pytest.fixture(scope="module")
def model_and_params():
    model = CLIP(TINY)
    batch = dummy_inputs(TINY, 2)
    variables = jax.jit(model.init)(jax.random.key(0), batch["image"], batch["tokens"])
    return model, variables


def _params(model_and_params):
    return nn.meta.unbox(model_and_params[1])["params"]


def _tokens():
    # BOS w w w EOS pad pad pad  /  BOS w w w w w EOS pad
    return jnp.array([[BOS, 5, 6, 7, EOS, 0, 0, 0], [BOS, 9, 10, 11, 12, 13, EOS, 0]], jnp.int32)


def _mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, model=2))


def test_eos_positions():
    toks = jnp.array([[1, 4, 2, 0], [1, 4, 5, 0], [0, 0, 0, 0], [1, 2, 2, 7]])
    np.testing.assert_array_equal(eos_positions(toks, eos_id=2, pad_id=0), [2, 2, 0, 1])


def test_text_embedding_reads_the_eos_state(model_and_params):
    model, _ = model_and_params
    params = _params(model_and_params)
    enc = jax.jit(lambda t: model.apply({"params": params}, t, method="encode_text_tokens"))
    tokens = _tokens()
    states, emb = enc(tokens)
    assert states.shape == (2, 8, TINY.text_width) and emb.shape == (2, TINY.embed_dim)
    assert emb.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    after = enc(tokens.at[0, 6].set(33))[1]  # a token after EOS (row 0)
    np.testing.assert_allclose(after[0], emb[0], atol=1e-6)
    before = enc(tokens.at[0, 2].set(33))[1]  # a token before EOS
    assert np.abs(np.asarray(before[0] - emb[0])).max() > 1e-4
    np.testing.assert_allclose(before[1], emb[1], atol=1e-6)  # other rows untouched


def test_text_tower_is_causal(model_and_params):
    model, _ = model_and_params
    params = _params(model_and_params)
    enc = jax.jit(lambda t: model.apply({"params": params}, t, method="encode_text_tokens")[0])
    tokens = _tokens()
    base = enc(tokens)
    for t in range(1, 8):
        moved = enc(tokens.at[:, t].set(40))
        np.testing.assert_allclose(moved[:, :t], base[:, :t], atol=1e-6)
        assert np.abs(np.asarray(moved[:, t] - base[:, t])).max() > 1e-4


def test_logit_scale_init_and_clamp(model_and_params):
    model, _ = model_and_params
    params = _params(model_and_params)
    scale = lambda p: float(model.apply({"params": p}, method="scale"))  # noqa: E731
    assert scale(params) == pytest.approx(1 / 0.07, rel=1e-5)
    big = dict(params, logit_scale=jnp.asarray(math.log(1000.0)))
    assert scale(big) == pytest.approx(100.0)
    b = dummy_inputs(TINY, 2)
    out = jax.jit(model.apply)({"params": big}, b["image"], b["tokens"])
    assert float(out[2]) == pytest.approx(100.0)


def _numpy_loss(img, txt, scale):
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = scale * img @ txt.T
    labels = np.arange(len(img))

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -logp[labels, labels].mean()

    return 0.5 * (ce(logits) + ce(logits.T)), (logits.argmax(1) == labels).mean()


def _embeddings(n=16, e=16, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (n, e))
    txt = img + 1.5 * jax.random.normal(k2, (n, e))  # correlated pairs: some hits, some misses
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return norm(img), norm(txt)


def test_contrastive_loss_matches_numpy():
    img, txt = _embeddings()
    loss, metrics = contrastive_loss(img, txt, 10.0)
    ref, acc = _numpy_loss(img, txt, 10.0)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert float(metrics["acc_i2t"]) == pytest.approx(acc)
    assert 0 < acc < 1


def test_sharded_loss_equals_single_device():
    mesh = _mesh()
    img, txt = _embeddings()
    f = lambda i, t, s, m: contrastive_loss(i, t, s, mesh=m)  # noqa: E731
    loss0, m0 = f(img, txt, 7.0, None)
    g0 = jax.grad(lambda i, t, s: f(i, t, s, None)[0], argnums=(0, 1, 2))(img, txt, 7.0)

    put = jax.device_put
    img_s, txt_s = put(img, sharding.batch_sharding(mesh, 2)), put(txt, sharding.batch_sharding(
        mesh, 2))
    loss1, m1 = jax.jit(lambda i, t: f(i, t, 7.0, mesh))(img_s, txt_s)
    assert float(loss1) == pytest.approx(float(loss0), abs=1e-6)
    for k in m0:
        assert float(m1[k]) == pytest.approx(float(m0[k]), abs=1e-6), k
    g1 = jax.jit(jax.grad(lambda i, t, s: f(i, t, s, mesh)[0], argnums=(0, 1, 2)))(
        img_s, txt_s, 7.0)
    for a, b in zip(g0, g1):  # embeddings and the temperature
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert abs(float(g0[2])) > 1e-4

    # Mesh found from the ambient context (what the train loop does).
    with jax.set_mesh(mesh):
        loss2, _ = jax.jit(lambda i, t: f(i, t, 7.0, None))(img_s, txt_s)
        lowered = jax.jit(lambda i, t: f(i, t, 7.0, None)).lower(img_s, txt_s).as_text()
    assert float(loss2) == pytest.approx(float(loss0), abs=1e-6)
    assert "all_gather" in lowered or "all-gather" in lowered


def test_sharded_loss_rejects_uneven_batch():
    img, txt = _embeddings(n=6)
    with pytest.raises(ValueError, match="batch shards"):
        contrastive_loss(img, txt, 1.0, mesh=_mesh())


def test_every_kernel_and_embedding_is_logically_named(model_and_params):
    for scan in (False, True):
        cfg = dataclasses.replace(TINY, scan_layers=scan)
        b = dummy_inputs(cfg, 2)
        abstract = jax.eval_shape(CLIP(cfg).init, jax.random.key(0), b["image"], b["tokens"])
        flat = jax.tree_util.tree_flatten_with_path(
            abstract["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
        assert len(flat) > 20
        for path, leaf in flat:
            name = jax.tree_util.keystr(path)
            assert isinstance(leaf, nn.LogicallyPartitioned), name
            assert len(leaf.names) == leaf.value.ndim, name
            if scan and "blocks" in name:
                assert leaf.names[0] == "layers", name


def test_sharded_init_and_forward_match_unsharded(model_and_params):
    model, variables = model_and_params
    mesh, rules = _mesh(), sharding.logical_rules()
    b = dummy_inputs(TINY, 8)
    b["image"] = np.asarray(jax.random.uniform(jax.random.key(3), b["image"].shape, minval=-1))
    b["tokens"] = np.tile(np.asarray(_tokens()), (4, 1))
    params = _params(model_and_params)
    ref = jax.jit(lambda p, bt: loss_fn(model, p, bt, None))(params, b)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), b["image"], b["tokens"])
        shardings = sharding.logical_shardings(abstract, mesh, rules)
        qkv = shardings["params"]["text"]["transformer"]["block_0"]["attn"]["query"]["kernel"]
        assert qkv.spec == jax.sharding.PartitionSpec("fsdp", "model", None)
        init = jax.jit(lambda r: nn.meta.unbox(model.init(r, b["image"], b["tokens"])),
                       out_shardings=shardings)
        sharded_params = init(jax.random.key(0))["params"]
        batch = sharding.shard_batch(b, mesh)
        out = jax.jit(lambda p, bt: loss_fn(model, p, bt, None))(sharded_params, batch)
    np.testing.assert_allclose(out[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(out[1]["acc_i2t"], ref[1]["acc_i2t"])


@pytest.mark.slow
def test_training_lowers_the_loss():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    model = CLIP(cfg)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
             "tokens": np.concatenate([np.full((8, 1), BOS), rng.integers(3, 64, (8, 5)),
                                       np.full((8, 1), EOS), np.zeros((8, 1))], 1).astype(
                                           np.int32)}
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch["image"],
                                                batch["tokens"]))
    params = params["params"]
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, s):
        (loss, _), g = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(model, p, batch, None)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    img = jax.jit(model.apply, static_argnames="method")(
        {"params": params}, batch["image"], method="encode_image")
    assert img.dtype == jnp.float32
    state = opt.init(params)
    losses = []
    for _ in range(15):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_zero_shot_with_a_hand_made_classifier():
    classifier = jnp.eye(4, 8)
    img = jnp.eye(4, 8)[jnp.array([2, 0, 3, 3, 1])] + 0.1
    np.testing.assert_array_equal(zero_shot.predict(img, classifier), [2, 0, 3, 3, 1])
    labels = jnp.array([2, 0, 3, 1, 1])
    assert zero_shot.accuracy(img, labels, classifier) == pytest.approx(0.8)
    assert zero_shot.accuracy(img, labels, classifier, k=4) == pytest.approx(1.0)


def test_build_classifier_ensembles_templates(model_and_params):
    model, _ = model_and_params
    params = _params(model_and_params)
    words = {"cat": 10, "dog": 11, "bird": 12, "a": 20, "photo": 21, "of": 22, "drawing": 23}

    def tokenize(texts):
        out = np.zeros((len(texts), TINY.context_length), np.int32)
        for i, t in enumerate(texts):
            ids = [BOS] + [words[w] for w in t.split()] + [EOS]
            out[i, :len(ids)] = ids
        return out

    classes = ["cat", "dog", "bird"]
    templates = ["a photo of {}", lambda c: f"a drawing of {c}"]
    clf = zero_shot.build_classifier(model, params, tokenize, classes, templates, batch_size=4)
    assert clf.shape == (3, TINY.embed_dim)
    np.testing.assert_allclose(jnp.linalg.norm(clf, axis=-1), 1.0, atol=1e-5)
    enc = model.apply({"params": params}, tokenize(["a photo of dog", "a drawing of dog"]),
                      method="encode_text")
    mean = enc.mean(0)
    np.testing.assert_allclose(clf[1], mean / jnp.linalg.norm(mean), atol=1e-5)
    # Images whose embeddings equal a class embedding are classified as that class.
    np.testing.assert_array_equal(zero_shot.predict(clf[jnp.array([2, 1, 0])], clf), [2, 1, 0])
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        zero_shot.build_classifier(model, params, tokenize, classes, ["a photo"])


def test_encode_images_batches_with_padding(model_and_params):
    model, _ = model_and_params
    params = _params(model_and_params)
    images = np.asarray(jax.random.uniform(jax.random.key(5), (5, 16, 16, 3), minval=-1))
    got = zero_shot.encode_images(model, params, images, batch_size=2)
    ref = jax.jit(model.apply, static_argnames="method")(
        {"params": params}, images, method="encode_image")
    assert got.shape == (5, TINY.embed_dim)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_conv_stem_tokens_names_and_bad_depth():
    cfg = dataclasses.replace(TINY, vision_stem=(8, 16))          # 2 stride-2 convs = patch 4
    b = dummy_inputs(cfg, 2)
    variables = CLIP(cfg).init(jax.random.key(0), b["image"], b["tokens"])
    visual = nn.meta.unbox(variables)["params"]["visual"]
    assert visual["stem_conv0"]["kernel"].shape == (3, 3, 3, 8)
    assert visual["stem_conv1"]["kernel"].shape == (3, 3, 8, 16)
    assert visual["patch_embed"]["kernel"].shape == (1, 1, 16, TINY.vision_width)
    image = jax.random.uniform(jax.random.key(1), b["image"].shape, minval=-1, maxval=1)
    states, feat = CLIP(cfg).apply(variables, image, method=lambda m, x: m.visual(x))
    assert states.shape == (2, 1 + (16 // 4) ** 2, TINY.vision_width)
    assert feat.shape == (2, TINY.embed_dim) and np.all(np.isfinite(feat))
    # Every parameter of the stem carries logical axis names (so the rules table shards it).
    flat = jax.tree_util.tree_flatten_with_path(
        variables["params"]["visual"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    for path, leaf in flat:
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    with pytest.raises(ValueError, match=r"gives patches of 8, not patch_size 4"):
        CLIP(dataclasses.replace(TINY, vision_stem=(8, 16, 32))).init(
            jax.random.key(0), b["image"], b["tokens"])


def _numpy_shared_loss(img, txt, scale, same):
    """The multi-positive loss written out: row i's target is uniform over j with same[i, j]."""
    logits = scale * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    target = same / same.sum(axis=1, keepdims=True)

    def ce(z):
        logp = z - z.max(axis=1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
        return -(target * logp).sum(axis=1).mean()

    return 0.5 * (ce(logits) + ce(logits.T)), same[np.arange(len(same)), logits.argmax(1)].mean()


def _groups(n=16):
    group = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6, 7, 8, 9, 10, 10])[:n]
    return group[:, None] == group[None, :]


def test_shared_positives_loss_matches_numpy_and_reduces_to_clip():
    img, txt = _embeddings()
    same = _groups()
    loss, metrics = contrastive_loss(img, txt, 10.0, same=same)
    ref, acc = _numpy_shared_loss(img, txt, 10.0, same)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert float(metrics["acc_i2t"]) == pytest.approx(acc)
    plain, _ = contrastive_loss(img, txt, 10.0)
    assert abs(float(loss) - float(plain)) > 1e-3          # duplicates do change the loss
    eye, _ = contrastive_loss(img, txt, 10.0, same=np.eye(16, dtype=bool))
    assert float(eye) == pytest.approx(float(plain), rel=1e-6)
    with pytest.raises(ValueError, match=r"same must be \[16, 16\] for a batch of 16"):
        contrastive_loss(img, txt, 10.0, same=np.eye(8, dtype=bool))


def test_shared_positives_sharded_equals_single_device():
    mesh = _mesh()
    img, txt = _embeddings()
    same = _groups()
    loss0, m0 = contrastive_loss(img, txt, 7.0, same=same)
    put = jax.device_put
    img_s, txt_s = (put(x, sharding.batch_sharding(mesh, 2)) for x in (img, txt))
    loss1, m1 = jax.jit(lambda i, t, s: contrastive_loss(i, t, 7.0, mesh=mesh, same=s))(
        img_s, txt_s, same)
    assert float(loss1) == pytest.approx(float(loss0), abs=1e-6)
    for k in m0:
        assert float(m1[k]) == pytest.approx(float(m0[k]), abs=1e-6), k


def test_loss_fn_shares_positives_between_equal_captions(model_and_params, monkeypatch):
    from unclip_jax.models import clip as clip_module

    cfg = dataclasses.replace(TINY, shared_positives=True)
    params = _params(model_and_params)
    images = jax.random.uniform(jax.random.key(3), (4, 16, 16, 3), minval=-1, maxval=1)
    tokens = jnp.concatenate([_tokens(), _tokens()[:1], _tokens()[1:]])   # rows 0=2, 1=3
    batch = {"image": images, "tokens": tokens}
    loss, _ = loss_fn(CLIP(cfg), params, batch)
    img, txt, scale = CLIP(cfg).apply({"params": params}, images, tokens)
    same = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], bool)
    ref, _ = _numpy_shared_loss(img, txt, float(scale), same)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    seen = []
    monkeypatch.setattr(clip_module, "contrastive_loss",
                        lambda *a, same=None, **k: seen.append(same) or (0.0, {}))
    loss_fn(CLIP(cfg), params, batch)
    loss_fn(CLIP(TINY), params, batch)
    np.testing.assert_array_equal(seen[0], same)
    assert seen[1] is None


def test_late_chroma_blocks_before_it_are_colour_blind():
    from unclip_jax.core import shapes as S

    cfg = dataclasses.replace(TINY, vision_colour_blocks=1)
    model = CLIP(cfg)
    b = dummy_inputs(cfg, 2)
    variables = model.init(jax.random.key(0), b["image"], b["tokens"])
    assert "chroma_embed" in variables["params"]["visual"]
    def paint(shape, colour):
        # Exact (unquantised) anti-aliased image: coverage from a white render, blended.
        white = S.render(S.Scene((S.ShapeObject("white", shape, "big", 0.4, 0.6),)), 16)
        alpha = (white[..., :1].astype(np.float32) - S.BACKGROUND[0]) / (
            S.PALETTE[S.COLOURS.index("white")][0] - S.BACKGROUND[0])
        rgb = S.BACKGROUND + alpha * (S.PALETTE[S.COLOURS.index(colour)] - S.BACKGROUND)
        return rgb / 127.5 - 1

    images = np.stack([paint("triangle", c) for c in ("red", "blue", "white")])

    def run(x):
        return model.apply(variables, x, method=lambda m, x: m.visual(x),
                           capture_intermediates=True)

    (_, feat), inter = run(images)
    early = inter["intermediates"]["visual"]["transformer"]["__call__"][0]
    # The same triangle in three colours: identical states up to the chroma injection...
    np.testing.assert_allclose(early[0], early[1], atol=1e-5)
    np.testing.assert_allclose(early[0], early[2], atol=1e-5)
    # ...and different features after it (colour still reaches the embedding).
    assert np.abs(feat[0] - feat[1]).max() > 1e-3
    # A different shape is seen before the injection.
    tri_vs_sq = np.stack([images[0], paint("square", "red")])
    early2 = run(tri_vs_sq)[1]["intermediates"]["visual"]["transformer"]["__call__"][0]
    assert np.abs(early2[0] - early2[1]).max() > 1e-3
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"colour_blocks=.* must be in \[1, depth = 2\]"):
            CLIP(dataclasses.replace(TINY, vision_colour_blocks=bad)).init(
                jax.random.key(0), b["image"], b["tokens"])
    # All blocks may see colour (the input is still split into luma and chroma).
    every = dataclasses.replace(TINY, vision_colour_blocks=2)
    params = CLIP(every).init(jax.random.key(0), b["image"], b["tokens"])["params"]["visual"]
    assert "transformer" not in params and "transformer_late" in params
