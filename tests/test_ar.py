"""The one AR decoder: KV cache vs full recompute, filtering, guidance, rng, no recompiles."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core import ar
from unclip_jax.core.nn.layers import layer_norm
from unclip_jax.core.nn.transformer import Transformer

V, W, P, N, B = 13, 16, 3, 6, 2


class TinyLM(nn.Module):
    """Token LM with a conditioning vector added to every position (test model)."""

    decode: bool = False

    @nn.compact
    def __call__(self, tokens, cond=None, prefill=True):
        x = nn.Embed(V, W, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.5), (P + N, W))
        start = 0
        if self.decode:
            init = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            start = 0 if prefill else position.value
            if init:
                position.value = start + tokens.shape[1]
        x = x + jax.lax.dynamic_slice_in_dim(pos, start, tokens.shape[1])[None]
        if cond is not None:
            x = x + nn.Dense(W, name="cond")(cond["c"])[:, None]
        x = Transformer(W, 2, 2, causal=True, decode=self.decode, name="tf")(x)
        return nn.Dense(V, name="head", kernel_init=nn.initializers.normal(1.0))(
            layer_norm(name="ln")(x))


@pytest.fixture(scope="module")
def setup():
    full = TinyLM()
    rng = jax.random.PRNGKey(0)
    tokens = jax.random.randint(rng, (B, P + N), 0, V)
    cond = {"c": jax.random.normal(jax.random.PRNGKey(1), (B, 4))}
    uncond = {"c": jnp.zeros((B, 4))}
    params = jax.jit(full.init)(rng, tokens, cond)["params"]
    model = ar.linen_model(TinyLM(decode=True), lambda b: (
        jnp.zeros((b, P + N), jnp.int32), {"c": jnp.zeros((b, 4))}))
    return dict(full=full, params=params, model=model, prompt=tokens[:, :P], cond=cond,
                uncond=uncond)


def _full_logits(s, out, cond):
    seq = jnp.concatenate([s["prompt"], out[:, :-1]], axis=1)
    return _apply(s["params"], seq, cond)[:, P - 1:]


@jax.jit
def _apply(params, tokens, cond):
    return TinyLM().apply({"params": params}, tokens, cond)


def _gen(s, rng=0, logits=False, **kw):
    """Tokens (and logits). Every call shares one compile per guided/unguided path: logits
    are always returned and an all-True vocab mask is the default (both traced)."""
    kw.setdefault("cond", s["cond"])
    kw.setdefault("vocab_mask", jnp.ones((N, V), bool))
    toks, lg = ar.generate(s["model"], s["params"], s["prompt"], jax.random.PRNGKey(rng),
                           num_tokens=N, return_logits=True, **kw)
    return (toks, lg) if logits else toks


def test_cached_decoding_equals_full_recompute(setup):
    s = setup
    toks, logits = _gen(s, temperature=0.0, logits=True)
    assert toks.shape == (B, N) and logits.shape == (B, N, V)
    ref = _full_logits(s, toks, s["cond"])
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    np.testing.assert_array_equal(toks, jnp.argmax(ref, -1))
    # Sampled (non-greedy) sequences too.
    toks, logits = _gen(s, rng=3, temperature=1.0, logits=True)
    np.testing.assert_allclose(logits, _full_logits(s, toks, s["cond"]), atol=1e-5)


def test_top_k_one_and_small_temperature_are_greedy(setup):
    s = setup
    greedy = _gen(s, temperature=0.0)
    for rng in range(3):
        np.testing.assert_array_equal(_gen(s, rng=rng, top_k=1), greedy)
        np.testing.assert_array_equal(_gen(s, rng=rng, temperature=1e-4), greedy)


def test_rng_determinism(setup):
    s = setup
    a, b = _gen(s, rng=5, temperature=2.0), _gen(s, rng=5, temperature=2.0)
    np.testing.assert_array_equal(a, b)
    others = [_gen(s, rng=r, temperature=2.0) for r in (6, 7, 8)]
    assert any(not np.array_equal(a, o) for o in others)


def test_guidance_endpoints(setup):
    s = setup
    kw = dict(temperature=0.0, logits=True)
    cond_only = _gen(s, **kw)
    uncond_only = _gen(s, cond=s["uncond"], **kw)
    g1 = _gen(s, uncond=s["uncond"], guidance_scale=1.0, **kw)
    g0 = _gen(s, uncond=s["uncond"], guidance_scale=0.0, **kw)
    np.testing.assert_array_equal(g1[0], cond_only[0])
    np.testing.assert_allclose(g1[1], cond_only[1], atol=1e-5)
    np.testing.assert_array_equal(g0[0], uncond_only[0])
    np.testing.assert_allclose(g0[1], uncond_only[1], atol=1e-5)
    # s = 3: the guided combination of the two full recomputes along the guided sequence.
    toks, logits = _gen(s, uncond=s["uncond"], guidance_scale=3.0, **kw)
    c, u = _full_logits(s, toks, s["cond"]), _full_logits(s, toks, s["uncond"])
    np.testing.assert_allclose(logits, u + 3.0 * (c - u), atol=1e-4)


def test_vocab_mask_restricts_each_position(setup):
    s = setup
    mask = np.zeros((N, V), bool)
    mask[0::2, 2:5] = True     # even positions: tokens 2..4
    mask[1::2, 9:] = True      # odd positions: tokens 9..12
    for rng in range(3):
        toks = np.asarray(_gen(s, rng=rng, temperature=3.0, vocab_mask=jnp.asarray(mask)))
        assert np.all(mask[np.arange(N), toks])


def test_settings_are_traced_no_recompile(setup):
    s = setup
    kw = dict(uncond=s["uncond"])
    _gen(s, guidance_scale=1.5, temperature=1.0, top_k=0, top_p=1.0, **kw)
    size = ar.generate._cache_size()
    for g, t, k, p in [(3.0, 0.5, 5, 0.9), (0.0, 0.0, 1, 0.3), (7.0, 2.0, 2, 0.5)]:
        _gen(s, rng=1, guidance_scale=g, temperature=t, top_k=k, top_p=p, **kw)
    assert ar.generate._cache_size() == size


def _np_top_p(probs, p):
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    n = int(np.searchsorted(cum, p - 1e-9) + 1)   # smallest prefix with mass >= p
    return set(order[:n].tolist())


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.61, 0.8, 0.95, 0.999])
def test_top_p_keeps_smallest_set_with_mass_p(p):
    probs = np.array([0.02, 0.3, 0.05, 0.25, 0.08, 0.15, 0.1, 0.04, 0.01])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = ar.filter_logits(logits[None], 1.0, 0, p)[0]
    got = set(np.flatnonzero(np.asarray(kept) > ar.NEG_INF / 2).tolist())
    assert got == _np_top_p(probs, p)
    assert probs[list(got)].sum() >= p - 1e-6


def test_top_k_then_top_p():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    kept = np.asarray(ar.filter_logits(logits, 1.0, 2, 1.0)[0]) > ar.NEG_INF / 2
    assert kept.tolist() == [True, True, False, False]
    # top-p on the renormalised top-k distribution: top-2 (0.571, 0.429) with p = 0.6 needs
    # both; top-3 (0.444, 0.333, 0.222) with p = 0.4 only the first (0.4 alone would not).
    kept = np.asarray(ar.filter_logits(logits, 1.0, 2, 0.6)[0]) > ar.NEG_INF / 2
    assert kept.tolist() == [True, True, False, False]
    kept = np.asarray(ar.filter_logits(logits, 1.0, 3, 0.4)[0]) > ar.NEG_INF / 2
    assert kept.tolist() == [True, False, False, False]
