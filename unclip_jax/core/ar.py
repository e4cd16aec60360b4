"""The one autoregressive decoder: KV-cached generation in one jitted ``lax.scan``.

Used by every token-by-token model (the AR prior, the DALL·E transformer). A model takes part
through an :class:`ARModel`, two pure functions::

    init_cache(batch_size) -> cache
        a zero KV cache (the linen ``cache`` collection) for ``batch_size`` rows, long enough
        for the prompt plus every generated token.
    apply(params, cache, tokens, cond, prefill) -> (logits, cache)
        tokens:  [B, n] int32, n = P (the prompt, ``prefill=True``, one call) or 1 (a step)
        cond:    a pytree of [B, …] arrays passed unchanged to every call (or None); a model
                 with a continuous prefix (e.g. caption states) writes it into the cache on the
                 prefill call, and otherwise only reads masks from it
        prefill: Python bool; models without a continuous prefix ignore it
        logits:  [B, n, V] float32; row t predicts the token after ``tokens[:, t]``

:func:`linen_model` builds one from a linen module made with ``decode=True``.

Sampling, per generated position i (0-based, i < N):

1. logits ``[B, V]`` from the last call; with classifier-free guidance the conditional and
   unconditional streams are *one* batch ``[2B]`` (cond ``[cond; uncond]``, same tokens) and
   ``logits = uncond + s · (cond − uncond)`` (``s`` = 1: conditional only, 0: unconditional);
2. per-position vocabulary restriction: ``vocab_mask[i]`` ``[V]`` bool, False → never sampled;
3. ``temperature`` ≤ 0 → greedy (argmax); else logits / temperature, then top-k (``top_k`` > 0
   keeps the k largest), then top-p (keeps the smallest set of most likely tokens whose
   probability mass is ≥ ``top_p``; 1 = off), then a categorical draw with the key
   ``fold_in(rng, i)``.

``guidance_scale``, ``temperature``, ``top_k``, ``top_p`` and ``vocab_mask`` are traced:
changing their values never recompiles (top-k is a threshold on sorted logits, not
``lax.top_k``). Only the model, ``num_tokens``, the shapes and ``return_logits`` are static.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

NEG_INF = -1e30   # masked logits (finite, so an all-masked row stays NaN-free)
TOP_P_TOL = 1e-6  # a mass within this of top_p counts as reaching it (float32 cumsum rounding)


class ARModel(NamedTuple):
    """A decode-mode model as two pure functions (see the module docstring)."""

    init_cache: Callable[[int], Any]
    apply: Callable[..., tuple[jax.Array, Any]]


def linen_model(module: nn.Module, example_inputs: Callable[[int], tuple]) -> ARModel:
    """An :class:`ARModel` from a linen ``module`` built with ``decode=True``.

    The module is called as ``module(tokens, cond, prefill=...)`` and returns ``[B, n, V]``
    logits. ``example_inputs(batch_size)`` gives the ``(tokens, cond)`` of the *longest*
    sequence (prompt + generated tokens) with ``prefill=True``: initialising on them sizes the
    KV cache. The cache is made from ``jax.eval_shape`` (no parameter is initialised).
    """
    def init_cache(batch_size: int):
        tokens, cond = example_inputs(batch_size)
        shapes = jax.eval_shape(functools.partial(module.init, prefill=True),
                                jax.random.PRNGKey(0), tokens, cond)
        if "cache" not in shapes:
            raise ValueError(f"{type(module).__name__} created no 'cache' collection; build it "
                             "with decode=True")
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes["cache"]))

    def apply(params, cache, tokens, cond, prefill):
        logits, new = module.apply({"params": params, "cache": cache}, tokens, cond,
                                   prefill=prefill, mutable=["cache"])
        return logits.astype(jnp.float32), new["cache"]

    return ARModel(init_cache, apply)


# ----------------------------------------------------------------------------- filtering


def filter_logits(logits: jax.Array, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """Tempered, top-k and top-p filtered logits ``[..., V]`` (removed entries = ``NEG_INF``).

    ``temperature`` > 0 (callers handle 0 as greedy), ``top_k`` int (0 = off), ``top_p`` in
    (0, 1] (1 = off); all may be traced. Ties at a threshold are all kept; a top-p mass
    within ``TOP_P_TOL`` of p counts as reaching it.
    """
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)                               # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None]
                              .astype(jnp.int32), axis=-1)
    logits = jnp.where(logits >= kth, logits, NEG_INF)
    ordered = jnp.where(jnp.arange(vocab) < k, ordered, NEG_INF)
    # Top-p over the top-k distribution: keep sorted entry j while the mass before it is < p.
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p - TOP_P_TOL) | (jnp.arange(vocab) == 0) | (top_p >= 1.0)
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    last = jnp.take_along_axis(ordered, n_keep - 1, axis=-1)
    return jnp.where(logits >= last, logits, NEG_INF)


def sample_token(rng: jax.Array, logits: jax.Array, temperature=1.0, top_k=0,
                 top_p=1.0) -> jax.Array:
    """``[B]`` int32 tokens from ``[B, V]`` logits; ``temperature`` ≤ 0 means greedy."""
    greedy = jnp.argmax(logits, axis=-1)
    drawn = jax.random.categorical(rng, filter_logits(logits, temperature, top_k, top_p))
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


# ----------------------------------------------------------------------------- generation


def _concat(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "return_logits"))
def generate(model: ARModel, params: Any, prompt: jax.Array, rng: jax.Array, *,
             num_tokens: int, cond: Any = None, uncond: Any = None,
             guidance_scale: float | jax.Array = 1.0, temperature: float | jax.Array = 1.0,
             top_k: int | jax.Array = 0, top_p: float | jax.Array = 1.0,
             vocab_mask: jax.Array | None = None, return_logits: bool = False):
    """Generate ``num_tokens`` tokens after ``prompt`` in one jitted call.

    Args:
      model: the :class:`ARModel` (static: hashed by its two functions).
      params: the model's params.
      prompt: ``[B, P]`` int32, P ≥ 1, prefilled in one call.
      rng: a key; position i draws with ``fold_in(rng, i)``.
      num_tokens: N (static).
      cond, uncond: conditioning pytrees of ``[B, …]`` arrays; ``uncond`` (same structure)
        switches classifier-free guidance on (one ``[2B]`` forward per step).
      guidance_scale: s (traced); ignored without ``uncond``.
      temperature, top_k, top_p: see :func:`filter_logits` (traced; temperature ≤ 0 = greedy).
      vocab_mask: optional ``[N, V]`` (or ``[V]``) bool, True = allowed at generated position i.
      return_logits: also return the guided (and vocab-masked), untempered, unfiltered
        logits ``[B, N, V]`` float32.
    Returns:
      ``[B, N]`` int32 tokens (and the logits when ``return_logits``).
    """
    batch = prompt.shape[0]
    guided = uncond is not None
    if guided:
        cond = _concat(cond, uncond)
    rows = 2 * batch if guided else batch
    scale = jnp.asarray(guidance_scale, jnp.float32)

    def forward(cache, tokens, prefill):
        if guided:
            tokens = jnp.concatenate([tokens, tokens], axis=0)
        logits, cache = model.apply(params, cache, tokens, cond, prefill)
        logits = logits[:, -1].astype(jnp.float32)
        if guided:
            c, u = logits[:batch], logits[batch:]
            logits = u + scale * (c - u)
        return logits, cache

    def pick(i, logits):
        if vocab_mask is not None:
            allowed = vocab_mask if vocab_mask.ndim == 1 else vocab_mask[i]
            logits = jnp.where(allowed, logits, NEG_INF)
        return sample_token(jax.random.fold_in(rng, i), logits, temperature, top_k, top_p), logits

    logits, cache = forward(model.init_cache(rows), prompt.astype(jnp.int32), True)
    first, first_logits = pick(0, logits)

    def body(carry, i):
        cache, token = carry
        logits, cache = forward(cache, token[:, None], False)
        token, logits = pick(i, logits)
        return (cache, token), (token, logits if return_logits else None)

    _, (rest, rest_logits) = jax.lax.scan(body, (cache, first), jnp.arange(1, num_tokens))
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    if not return_logits:
        return tokens
    return tokens, jnp.concatenate([first_logits[:, None], rest_logits.swapaxes(0, 1)], axis=1)
