"""Zero-shot classification with CLIP: prompt-ensembled class embeddings and top-k accuracy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core import sharding
from unclip_jax.models.clip import FrozenCLIP

Template = str | Callable[[str], str]


def _prompt(template: Template, classname: str) -> str:
    if callable(template):
        return template(classname)
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the class name; pass a "
                         "format string with '{}' or a callable classname -> prompt")
    return template.format(classname)


def _batched(fn: Callable[[jax.Array], jax.Array], x: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply a jitted ``fn`` over the leading axis in fixed-size batches (last one padded, so
    there is a single compilation). ``x`` is the same on every process; the result, which the
    model's logical constraints may split over every process's devices, is gathered whole."""
    n = x.shape[0]
    out = []
    for start in range(0, n, batch_size):
        chunk = x[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad and n > batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(sharding.fetch(fn(chunk))[: min(batch_size, n - start)])
    return np.concatenate(out)


def encode_texts(model, params, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``[N, L]`` tokens → ``[N, E]`` unit-norm text embeddings (jitted, batched)."""
    fn = jax.jit(lambda p, t: FrozenCLIP(model.config, p).encode_text(t)["emb"])
    return _batched(functools.partial(fn, params), np.asarray(tokens, np.int32), batch_size)


def encode_images(model, params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``[N, H, W, 3]`` in [-1, 1] → ``[N, E]`` unit-norm image embeddings (jitted, batched).

    ``params`` is the ``params`` collection (passed as an argument, not baked into the jit).
    """
    fn = jax.jit(lambda p, x: FrozenCLIP(model.config, p).embed_images(x))
    return _batched(functools.partial(fn, params), np.asarray(images, np.float32), batch_size)


def build_classifier(model, params, tokenize: Callable[[list[str]], np.ndarray],
                     classnames: Sequence[str], templates: Sequence[Template],
                     batch_size: int = 256) -> jax.Array:
    """``[C, E]`` class embeddings: per class, the mean of its unit-norm template embeddings,
    re-normalised (CLIP's prompt ensembling).

    ``tokenize`` maps a list of strings to ``[N, L]`` int tokens; each template is a format
    string with ``{}`` or a callable ``classname -> prompt``.
    """
    if not classnames or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    prompts = [_prompt(t, c) for c in classnames for t in templates]
    emb = encode_texts(model, params, np.asarray(tokenize(prompts)), batch_size)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return jnp.asarray(emb, jnp.float32)


@jax.jit
def logits(img_emb: jax.Array, classifier: jax.Array) -> jax.Array:
    """``[N, C]`` cosine similarities of ``[N, E]`` image embeddings to ``[C, E]`` classes."""
    return jnp.dot(img_emb.astype(jnp.float32), classifier.T, precision="highest")


def predict(img_emb: jax.Array, classifier: jax.Array) -> jax.Array:
    """``[N]`` int: the most similar class for each image embedding."""
    return jnp.argmax(logits(img_emb, classifier), axis=-1)


def accuracy(img_emb: jax.Array, labels: jax.Array, classifier: jax.Array,
             k: int = 1) -> float:
    """Top-``k`` accuracy in [0, 1] of zero-shot predictions against ``[N]`` int ``labels``."""
    scores = logits(img_emb, classifier)
    k = min(k, scores.shape[-1])
    topk = jax.lax.top_k(scores, k)[1]
    hit = jnp.any(topk == jnp.asarray(labels)[:, None], axis=-1)
    return float(jnp.mean(hit.astype(jnp.float32)))
