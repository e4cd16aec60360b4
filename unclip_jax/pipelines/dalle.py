"""DALL·E text → image with CLIP reranking (Ramesh et al. 2021, §2.3 and §3).

For every caption, ``N`` candidates are drawn from the transformer (one batch of ``B·N``
streams through :func:`unclip_jax.core.ar.generate`), decoded by the dVAE, and scored by CLIP:
``score = 100 · cos(CLIP image embedding, CLIP caption embedding)`` (the embeddings are unit
norm, so this is the dot product × 100). Images are resized (bilinear, antialiased) to the
CLIP's resolution when it differs from the dVAE's. The candidates come back sorted by score,
best first, with ``order`` = the index of each candidate in drawing order (``order == 0`` is
the first sample, i.e. what one would get without reranking).

Everything from token ids to sorted images is one ``jax.jit`` per input shape
(:meth:`DallePipeline.rerank_fn`); :meth:`DallePipeline.generate_reranked` only tokenizes the
captions on the host (with the DALL·E and the CLIP tokenizers, which may differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from unclip_jax.core.images import to_uint8
from unclip_jax.models import dalle as dalle_lib
from unclip_jax.models import dvae as dvae_lib


class Reranked(NamedTuple):
    """``images`` ``[B, N, H, W, 3]`` in [-1, 1], best first; ``scores`` ``[B, N]`` float32
    (100 × cosine), descending; ``order`` ``[B, N]`` int32 drawing index of each candidate;
    ``codes`` ``[B, N, g, g]`` the dVAE codes."""

    images: jax.Array
    scores: jax.Array
    order: jax.Array
    codes: jax.Array


def clip_scores(clip_model, clip_params, images: jax.Array, clip_tokens: jax.Array) -> jax.Array:
    """``[B, N]`` 100 × cosine between images ``[B, N, H, W, 3]`` in [-1, 1] and the captions
    ``clip_tokens`` ``[B, L_clip]``; images are resized to the CLIP's resolution if needed."""
    from unclip_jax.models.clip import FrozenCLIP

    b, n, h, w, c = images.shape
    clip = FrozenCLIP(clip_model.config, clip_params)
    img = clip.embed_images(images.reshape(b * n, h, w, c))
    txt = clip.encode_text(clip_tokens)["emb"]
    return 100.0 * jnp.einsum("bne,be->bn", img.reshape(b, n, -1), txt,
                              precision=jax.lax.Precision.HIGHEST)


class DallePipeline:
    """The three frozen models (modules and configs; params are arguments) and the tokenizers.

    ``rerank_fn(dalle_params, dvae_params, clip_params, text, clip_tokens, rng, guidance_scale,
    temperature, top_k, top_p, *, num_candidates, guided)`` is the pure jitted function
    (``text`` ``[B, L]`` DALL·E ids, ``clip_tokens`` ``[B, L_clip]``); the sampling settings
    are traced (changing them never recompiles), ``num_candidates`` and ``guided`` are static.
    """

    def __init__(self, dalle_cfg: dalle_lib.DalleConfig, dvae_model, clip_model,
                 tokenizer=None, clip_tokenizer=None):
        self.cfg, self.dvae, self.clip = dalle_cfg, dvae_model, clip_model
        self.tokenizer, self.clip_tokenizer = tokenizer, clip_tokenizer
        if dvae_model.config.vocab_size != dalle_cfg.image_vocab_size or \
                dvae_model.config.grid_size != dalle_cfg.grid_size:
            raise ValueError(f"the dVAE ({dvae_model.config.vocab_size} codes, grid "
                             f"{dvae_model.config.grid_size}) does not match the transformer "
                             f"({dalle_cfg.image_vocab_size} codes, grid {dalle_cfg.grid_size})")
        self.rerank_fn = jax.jit(self._rerank, static_argnames=("num_candidates", "guided"))

    def _rerank(self, dalle_params, dvae_params, clip_params, text, clip_tokens, rng,
                guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, *,
                num_candidates: int, guided: bool = False) -> Reranked:
        b, n = text.shape[0], num_candidates
        codes = dalle_lib.sample(self.cfg, dalle_params, jnp.repeat(text, n, axis=0), rng,
                                 guidance_scale=guidance_scale, guided=guided,
                                 temperature=temperature, top_k=top_k, top_p=top_p)
        images = dvae_lib.decode(self.dvae, dvae_params, codes)
        images = images.reshape(b, n, *images.shape[1:])
        scores = clip_scores(self.clip, clip_params, images, clip_tokens)
        order = jnp.argsort(-scores, axis=1, stable=True).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(  # noqa: E731
            x, order.reshape(b, n, *([1] * (x.ndim - 2))), axis=1)
        return Reranked(take(images), take(scores), order,
                        take(codes.reshape(b, n, *codes.shape[1:])))

    def generate_reranked(self, dalle_params, dvae_params, clip_params, captions: list[str],
                          rng: jax.Array, *, num_candidates: int = 8,
                          guidance_scale: float = 1.0, temperature: float = 1.0,
                          top_k: int = 0, top_p: float = 1.0) -> Reranked:
        """Captions → :class:`Reranked` (``N = num_candidates`` per caption, best first)."""
        if self.tokenizer is None or self.clip_tokenizer is None:
            raise ValueError("this pipeline has no tokenizers; call rerank_fn with token ids")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        text = jnp.asarray(self.tokenizer.encode(captions, self.cfg.text_length))
        clip_tokens = jnp.asarray(self.clip_tokenizer.encode(
            captions, self.clip.config.context_length))
        return self.rerank_fn(dalle_params, dvae_params, clip_params, text, clip_tokens, rng,
                              guidance_scale, temperature, top_k, top_p,
                              num_candidates=num_candidates, guided=guidance_scale != 1.0)


def load_pipeline(dalle_workdir: str | Path, clip_workdir: str | Path | None = None
                  ) -> tuple[DallePipeline, dict[str, Any]]:
    """``(pipeline, params)`` of trained runs; ``params`` has ``dalle``, ``dvae``, ``clip``.
    ``clip_workdir`` defaults to the DALL·E config's ``clip_workdir``."""
    from unclip_jax.core.text import Tokenizer
    from unclip_jax.models.clip import CLIP
    from unclip_jax.train import runs

    cfg, params, tok, dvae_model, dvae_params = runs.load_dalle(dalle_workdir)
    clip_workdir = clip_workdir or cfg.clip_workdir
    if not clip_workdir:
        raise ValueError("no CLIP workdir to rerank with: pass one (--clip) or set "
                         "model.clip_workdir in the DALL·E config")
    clip = runs.load_clip(clip_workdir)
    clip_tok = Tokenizer.load(runs.tokenizer_path(clip_workdir))
    pipe = DallePipeline(cfg, dvae_model, CLIP(clip.config), tok, clip_tok)
    return pipe, {"dalle": params, "dvae": dvae_params, "clip": clip.params}


def evaluate_shapes(pipe: DallePipeline, params: dict, *, num_prompts: int = 64,
                    num_candidates: int = 8, seed: int = 0, batch_size: int = 16,
                    **settings) -> dict[str, float]:
    """Judged prompt fidelity on held-out single-object test captions (every one a colour +
    shape pair never seen in training): the fraction of prompts whose image shows the right
    colour and shape, for the CLIP-best of ``num_candidates`` (``reranked``), for the first
    sample drawn (``first``, i.e. no reranking), and for any candidate (``oracle``);
    ``*_shape`` count the shape alone."""
    import numpy as np

    from unclip_jax.core import shapes

    prompts = dalle_lib.heldout_prompts(num_prompts, seed)
    best, first, oracle, best_shape, first_shape = [], [], [], [], []
    for start in range(0, num_prompts, batch_size):
        part = prompts[start:start + batch_size]
        out = pipe.generate_reranked(params["dalle"], params["dvae"], params["clip"], part,
                                     jax.random.fold_in(jax.random.PRNGKey(seed), start),
                                     num_candidates=num_candidates, **settings)
        pixels = to_uint8(out.images)
        order = np.asarray(out.order)
        for p, row, o in zip(part, pixels, order):
            judged = [shapes.score_caption(im, p) for im in row]
            ok = [all(j["colour_shape_correct"]) for j in judged]
            shape_ok = [all(j["shape_correct"]) for j in judged]
            k = int(np.argmax(o == 0))
            best.append(ok[0])
            first.append(ok[k])
            oracle.append(any(ok))
            best_shape.append(shape_ok[0])
            first_shape.append(shape_ok[k])
    return {"reranked": float(np.mean(best)), "first": float(np.mean(first)),
            "oracle": float(np.mean(oracle)), "reranked_shape": float(np.mean(best_shape)),
            "first_shape": float(np.mean(first_shape)), "num_prompts": num_prompts,
            "num_candidates": num_candidates}
