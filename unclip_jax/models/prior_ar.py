"""The autoregressive prior of unCLIP (Ramesh et al. 2022, §2.2): caption → CLIP image embedding.

The image embedding becomes a sequence of discrete codes: PCA fitted on the training image
embeddings keeps the ``pca_dims`` directions of largest variance (the paper keeps 319 of 1024,
where the rest carry almost no variance); each coefficient is quantized into ``num_buckets``
buckets (paper: 1024). A decoder-only transformer predicts the codes in order of decreasing
variance from the sequence::

    [ text states (L, projected) | text embedding (1) | similarity token | code_1 … code_K ]
      \\_________ continuous prefix (masked where padded) ________/

The similarity token is the quantized dot product of the CLIP text and image embeddings
(buckets = quantiles of the training similarities, so every bucket is equally common); at
sampling time it is set to the bucket of a chosen percentile of the training similarities
(the paper samples from the top half; ``sim_percentile`` = 50 is its boundary). The caption
(states and embedding) is dropped with probability ``caption_dropout`` for classifier-free
guidance: its states are masked out and its embedding replaced by a learned null vector.
Sampling runs :func:`unclip_jax.core.ar.generate`; codes → bucket centres → inverse PCA →
re-normalised to unit norm.

Quantization choice: ``"uniform"`` (default) splits ``[min, max]`` of each coefficient over the
training set into equal buckets, so every training coefficient is within half a bucket width
of its centre; ``"quantile"`` uses per-dimension quantiles (equal counts per bucket, finer
where the data are dense). Both are stored as per-dimension bucket edges ``[K, num_buckets+1]``;
a code decodes to the midpoint of its bucket. The quantizer's arrays are saved in the workdir
as ``ar_prior_quantizer.npz`` (plain arrays, no pickle).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax.core import ar
from unclip_jax.core.nn.attention import padding_mask
from unclip_jax.core.nn.layers import dtype as to_dtype
from unclip_jax.core.nn.layers import layer_norm
from unclip_jax.core.nn.transformer import Transformer
from unclip_jax.models.prior import repeat_candidates, rerank

QUANTIZER_FILE = "ar_prior_quantizer.npz"
QUANTIZATIONS = ("uniform", "quantile")


@dataclasses.dataclass(frozen=True)
class ARPriorConfig:
    """AR prior sizes. ``embed_dim``, ``text_length``, ``text_width`` are set from the data.

    ``pca_dims`` default 24 of E = 64 keeps ~the paper's ratio (319 / 1024 ≈ 0.31) rounded up
    for our small E: on the shapes CLIP the top 24 components hold nearly all the variance.
    """

    embeddings_dir: str = "runs/demo/embeddings"   # cache of ``unclip-jax embed``
    embed_dim: int = 64             # E
    text_length: int = 24           # L
    text_width: int = 64            # W of the CLIP text states
    pca_dims: int = 24              # K codes per embedding
    num_buckets: int = 256          # codes per PCA coefficient (paper 1024)
    quantization: str = "uniform"   # "uniform" | "quantile"
    sim_buckets: int = 16           # similarity-token buckets (training quantiles)
    sim_percentile: float = 50.0    # sampling: condition on this training-similarity percentile
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    caption_dropout: float = 0.1    # for classifier-free guidance (0 = never dropped)

    @property
    def seq_length(self) -> int:
        """T = L text states + text embedding + similarity token + K codes."""
        return self.text_length + 2 + self.pca_dims


# ----------------------------------------------------------------------------- quantizers


def _bucket(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the bucket of each value given ``edges`` ``[nb+1]`` (outside → end buckets)."""
    return np.searchsorted(edges[1:-1], values, side="right").astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PCAQuantizer:
    """PCA + per-dimension bucketing of unit-norm embeddings ``[n, E]`` ↔ codes ``[n, K]``.

    mean ``[E]``; components ``[K, E]`` orthonormal rows by decreasing variance; variances
    ``[K]`` (training variance of each coefficient); edges ``[K, nb+1]`` bucket boundaries.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    edges: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray, dims: int, num_buckets: int,
            method: str = "uniform") -> "PCAQuantizer":
        if method not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {method!r}; accepted: "
                             f"{', '.join(QUANTIZATIONS)}")
        x = np.asarray(embeddings, np.float64)
        if not 1 <= dims <= x.shape[1]:
            raise ValueError(f"pca_dims must be in [1, {x.shape[1]}] (the embedding width), "
                             f"got {dims}")
        if num_buckets < 2:
            raise ValueError(f"num_buckets must be ≥ 2, got {num_buckets}")
        mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        components = vt[:dims]
        coeffs = (x - mean) @ components.T
        if method == "uniform":
            lo, hi = coeffs.min(0), coeffs.max(0)
            hi = np.maximum(hi, lo + 1e-6)
            edges = lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, num_buckets + 1)
        else:
            edges = np.quantile(coeffs, np.linspace(0, 1, num_buckets + 1), axis=0).T
        variances = s[:dims] ** 2 / max(len(x) - 1, 1)
        return cls(mean.astype(np.float32), components.astype(np.float32),
                   variances.astype(np.float32), edges.astype(np.float32))

    @property
    def dims(self) -> int:
        return self.components.shape[0]

    @property
    def num_buckets(self) -> int:
        return self.edges.shape[1] - 1

    def project(self, x: np.ndarray) -> np.ndarray:
        """``[n, E]`` → PCA coefficients ``[n, K]`` (float32)."""
        return ((np.asarray(x, np.float32) - self.mean) @ self.components.T).astype(np.float32)

    def reconstruct(self, coeffs):
        """Coefficients ``[…, K]`` → embeddings ``[…, E]`` (numpy or jax; not normalised)."""
        return coeffs @ self.components + self.mean

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``[n, E]`` → codes ``[n, K]`` int32 in ``[0, num_buckets)`` (numpy)."""
        c = self.project(x)
        return np.stack([_bucket(c[:, k], self.edges[k]) for k in range(self.dims)], axis=1)

    def decode_coeffs(self, codes):
        """Codes ``[…, K]`` → bucket-centre coefficients ``[…, K]`` (jax; works under jit)."""
        centres = jnp.asarray(0.5 * (self.edges[:, 1:] + self.edges[:, :-1]))   # [K, nb]
        codes = jnp.clip(codes, 0, self.num_buckets - 1)
        return jnp.take_along_axis(centres, codes.reshape(-1, self.dims).T, axis=1).T.reshape(
            codes.shape)

    def decode(self, codes) -> jax.Array:
        """Codes ``[…, K]`` → unit-norm embeddings ``[…, E]`` float32 (jax)."""
        x = self.reconstruct(self.decode_coeffs(codes))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


@dataclasses.dataclass(frozen=True)
class SimilarityBuckets:
    """Quantile buckets of text–image dot products: edges ``[S+1]`` from the training set."""

    edges: np.ndarray

    @classmethod
    def fit(cls, sims: np.ndarray, num_buckets: int) -> "SimilarityBuckets":
        if num_buckets < 1:
            raise ValueError(f"sim_buckets must be ≥ 1, got {num_buckets}")
        return cls(np.quantile(np.asarray(sims, np.float64),
                               np.linspace(0, 1, num_buckets + 1)).astype(np.float32))

    @property
    def num_buckets(self) -> int:
        return len(self.edges) - 1

    def encode(self, sims: np.ndarray) -> np.ndarray:
        """``[n]`` similarities → ``[n]`` int32 buckets in ``[0, S)``."""
        return _bucket(np.asarray(sims, np.float32), self.edges)

    def at_percentile(self, percentile: float) -> int:
        """The bucket holding the ``percentile``-th (0–100) training similarity."""
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"sim_percentile must be in [0, 100], got {percentile}")
        value = np.interp(percentile / 100.0, np.linspace(0, 1, len(self.edges)), self.edges)
        return int(self.encode(np.array([value]))[0])


def save_quantizers(path: str | Path, pca: PCAQuantizer, sim: SimilarityBuckets) -> None:
    arrays = {f"pca_{f.name}": getattr(pca, f.name) for f in dataclasses.fields(pca)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:                  # written whole, then renamed
        np.savez(f, **arrays, sim_edges=sim.edges)
    os.replace(tmp, path)


def load_quantizers(path: str | Path) -> tuple[PCAQuantizer, SimilarityBuckets]:
    with np.load(path, allow_pickle=False) as z:
        pca = PCAQuantizer(**{f.name: z[f"pca_{f.name}"] for f in
                              dataclasses.fields(PCAQuantizer)})
        return pca, SimilarityBuckets(z["sim_edges"])


def similarities(data: dict) -> np.ndarray:
    """``[n]`` dot products of the (unit-norm) CLIP text and image embeddings."""
    return np.sum(np.asarray(data["text_emb"], np.float32)
                  * np.asarray(data["image_emb"], np.float32), axis=-1)


def encode_sequences(data: dict, pca: PCAQuantizer, sim: SimilarityBuckets) -> np.ndarray:
    """``[n, K+1]`` int32 model tokens: similarity token (id ``nb + bucket``), then the codes."""
    codes = pca.encode(data["image_emb"])
    sim_tok = pca.num_buckets + sim.encode(similarities(data))
    return np.concatenate([sim_tok[:, None], codes], axis=1).astype(np.int32)


# ----------------------------------------------------------------------------- model


class ARPrior(nn.Module):
    """Caption → logits over the next PCA code.

    ``__call__(tokens, cond, prefill=True)``:
      tokens: ``[B, n]`` int32; ``[sim, code_1 … code_K]`` (n = K+1) for training, or the
        prompt ``[sim]`` (prefill) and then one code per call in decode mode. Ids: codes in
        ``[0, nb)``, similarity tokens ``nb + bucket``.
      cond: ``text_states [B, L, W]`` (any float), ``text_tokens [B, L]`` int32 (pad id 0,
        marks valid states), ``text_emb [B, E]``, optional ``keep [B]`` bool (False = caption
        dropped → null conditioning).
      prefill: in decode mode, whether this call starts the sequence (writes the caption
        prefix); ignored otherwise (the prefix is always written).
    Returns ``[B, n, nb]`` float32 logits; row t predicts the code after ``tokens[:, t]``.
    """

    config: ARPriorConfig
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, cond: dict, prefill: bool = True) -> jax.Array:
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        nb, total = cfg.num_buckets, cfg.seq_length
        batch, n = tokens.shape
        keep = cond.get("keep")
        keep = jnp.ones((batch,), jnp.bool_) if keep is None else keep.astype(jnp.bool_)
        text_valid = (cond["text_tokens"] != 0) & keep[:, None]
        valid = jnp.concatenate([text_valid, jnp.ones((batch, total - cfg.text_length),
                                                      jnp.bool_)], axis=1)
        dense = functools.partial(nn.Dense, cfg.width, dtype=dt, kernel_init=(
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, "embed"))),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
        embed = nn.Embed(nb + cfg.sim_buckets, cfg.width, dtype=dt, name="token_embedding",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("vocab", "embed")))
        pos = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), ("length", "embed")), (total, cfg.width))
        null = self.param("null_text_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (cfg.width,))

        x = embed(tokens)
        start = 0
        if self.decode:
            initialised = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            start = 0 if prefill else position.value
        if not self.decode or prefill:
            states = dense(name="text_states_proj")(cond["text_states"].astype(jnp.float32))
            emb = dense(name="text_emb_proj")(cond["text_emb"].astype(jnp.float32))
            emb = jnp.where(keep[:, None], emb, null.astype(dt))
            x = jnp.concatenate([states.astype(dt), emb[:, None].astype(dt), x], axis=1)
        length = x.shape[1]
        x = x + jax.lax.dynamic_slice_in_dim(pos, start, length).astype(dt)[None]
        if self.decode and initialised:
            position.value = start + length
        if not self.decode and length != total:
            raise ValueError(f"training sequences have K+1 = {cfg.pca_dims + 1} tokens, got {n}")

        x = Transformer(cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.act,
                        causal=True, dtype=dt, scan_layers=cfg.scan_layers, remat=cfg.remat,
                        decode=self.decode, name="transformer")(x, padding_mask(valid))
        x = layer_norm(name="ln_final")(x[:, -n:])
        logits = nn.Dense(nb, dtype=jnp.float32, name="head", kernel_init=(
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab"))),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def dummy_inputs(cfg: ARPriorConfig, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A zero batch with the training input shapes (for ``init`` / ``eval_shape``)."""
    return {"tokens": np.zeros((batch_size, cfg.pca_dims + 1), np.int32),
            "text_states": np.zeros((batch_size, cfg.text_length, cfg.text_width), np.float32),
            "text_tokens": np.zeros((batch_size, cfg.text_length), np.int32),
            "text_emb": np.zeros((batch_size, cfg.embed_dim), np.float32)}


def cond_inputs(batch: dict, keep=None) -> dict:
    """The model's conditioning from a batch: the caption's states and tokens and its CLIP text
    embedding, plus ``keep`` (rows whose caption is kept; caption dropout) when given."""
    cond = {k: batch[k] for k in ("text_states", "text_tokens", "text_emb")}
    if keep is not None:
        cond["keep"] = keep
    return cond


def loss_fn(model: ARPrior, params, batch: dict, rng: jax.Array | None = None):
    """Mean cross-entropy of the K codes (nats per code), captions dropped with
    ``caption_dropout`` when ``rng`` is given. Returns ``(loss, metrics)``."""
    tokens = batch["tokens"]
    keep = None
    if rng is not None and model.config.caption_dropout > 0:
        keep = jax.random.uniform(rng, tokens.shape[:1]) >= model.config.caption_dropout
    logits = model.apply({"params": params}, tokens, cond_inputs(batch, keep))[:, :-1]
    targets = tokens[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    acc = jnp.mean(jnp.argmax(logits, -1) == targets)
    return jnp.mean(ce), {"code_accuracy": acc, "ce_first_code": jnp.mean(ce[:, 0])}


# ----------------------------------------------------------------------------- sampling


def make_sampler(cfg: ARPriorConfig, pca: PCAQuantizer, sim: SimilarityBuckets, *,
                 guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, sim_percentile: float | None = None,
                 num_candidates: int = 1) -> Callable[[Any, dict, jax.Array], jax.Array]:
    """``sample(params, inputs, rng) -> [B, E]`` unit-norm image embeddings (jitted).

    ``inputs``: ``text_emb [B, E]``, ``text_states [B, L, W]``, ``text_tokens [B, L]``.
    The similarity token is the bucket of ``sim_percentile`` (default ``cfg.sim_percentile``);
    guidance runs (one batched forward) when ``guidance_scale`` ≠ 1 and the model was trained
    with caption dropout. ``num_candidates`` = k > 1 draws k embeddings per caption (one
    ``k·B`` batch) and keeps the one with the highest dot product with the text embedding —
    the rerank unCLIP uses for its diffusion prior (:func:`unclip_jax.models.prior.rerank`);
    the paper's AR prior draws one (k = 1, the default).
    """
    if guidance_scale != 1.0 and cfg.caption_dropout <= 0:
        raise ValueError("guidance needs a model trained with caption_dropout > 0; this one "
                         "never saw a dropped caption")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be ≥ 1, got {num_candidates}")
    guided = guidance_scale != 1.0
    sim_token = cfg.num_buckets + sim.at_percentile(
        cfg.sim_percentile if sim_percentile is None else sim_percentile)
    module = ARPrior(cfg, decode=True)

    def example(b):
        d = dummy_inputs(cfg, b)
        return jnp.asarray(d["tokens"]), cond_inputs(d, jnp.ones((b,), jnp.bool_))

    model = ar.linen_model(module, example)

    @jax.jit
    def sample(params, inputs: dict, rng: jax.Array) -> jax.Array:
        text_emb = inputs["text_emb"]
        k = num_candidates
        if k > 1:
            inputs = repeat_candidates(inputs, k)
        b = inputs["text_emb"].shape[0]
        cond = cond_inputs(inputs, jnp.ones((b,), jnp.bool_))
        cond["text_states"] = cond["text_states"].astype(jnp.float32)
        uncond = dict(cond, keep=jnp.zeros((b,), jnp.bool_)) if guided else None
        prompt = jnp.full((b, 1), sim_token, jnp.int32)
        codes = ar.generate(model, params, prompt, rng, num_tokens=cfg.pca_dims, cond=cond,
                            uncond=uncond, guidance_scale=guidance_scale,
                            temperature=temperature, top_k=top_k, top_p=top_p)
        emb = pca.decode(codes)
        if k == 1:
            return emb
        return rerank(emb.reshape(k, -1, emb.shape[-1]), text_emb)

    return sample


# ----------------------------------------------------------------------------- training task


def model_arrays(data: dict, pca: PCAQuantizer, sim: SimilarityBuckets) -> dict:
    """The model's arrays from cached embeddings: the image embedding as its code sequence
    (PCA codes then the similarity bucket, :func:`encode_sequences`) and the caption's
    features."""
    return {"tokens": encode_sequences(data, pca, sim),
            "text_states": np.asarray(data["text_states"], np.float32),
            "text_tokens": np.asarray(data["text_tokens"], np.int32),
            "text_emb": np.asarray(data["text_emb"], np.float32)}


