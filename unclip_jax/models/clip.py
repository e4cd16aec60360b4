"""CLIP (Radford et al. 2021): ViT image tower + causal text transformer in one embedding space.

Text feature = final-LN state at the EOS position, linearly projected; both embeddings are
L2-normalised; the temperature is learned (``logit_scale``, used as ``exp`` clamped at 100);
the loss is the symmetric cross-entropy over the *global* batch across the mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from unclip_jax.core import sharding
from unclip_jax.core.nn.layers import dtype as to_dtype
from unclip_jax.core.nn.layers import layer_norm
from unclip_jax.core.nn.transformer import Transformer
from unclip_jax.core.nn.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Sizes of the two towers. Defaults are a small CPU-scale model for 32 px shapes."""

    embed_dim: int = 64             # joint embedding E
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vocab_size: int = 512
    context_length: int = 32        # L, tokens incl. BOS/EOS
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"         # "quick_gelu" (OpenAI CLIP) or "gelu"
    eos_id: int = 2                 # text feature is read at the first EOS
    pad_id: int = 0                 # without an EOS: the last non-pad position
    dtype: str = "float32"          # compute dtype; "bfloat16" on TPU/GPU
    scan_layers: bool = False
    remat: str = "none"             # "none" | "full" | "dots_saveable" | ...
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    # Conv-stem channels, one stride-2 3×3 conv each (so log2(patch_size) of them), or () for
    # the linear patch embedding (see ``unclip_jax.core.nn.vit``).
    vision_stem: tuple[int, ...] = ()
    # > 0: only the last ``vision_colour_blocks`` ViT blocks see colour, the ones before see a
    # colour-blind image (see ``unclip_jax.core.nn.vit``); 0: plain RGB ViT.
    vision_colour_blocks: int = 0
    # Loss: treat every pair of rows with identical tokens as positives (a uniform target over
    # them) instead of only the diagonal. Small captioned datasets repeat captions within a
    # batch ("a small red circle"); the diagonal-only loss pushes those equal captions apart.
    shared_positives: bool = False


# The paper's towers (OpenAI BPE: vocab 49408, EOS 49407) and unCLIP's ViT-H/16.
PRESETS = {
    "vit_b32": CLIPConfig(512, 224, 32, 768, 12, 12, 49408, 77, 512, 12, 8, eos_id=49407),
    "vit_b16": CLIPConfig(512, 224, 16, 768, 12, 12, 49408, 77, 512, 12, 8, eos_id=49407),
    "vit_l14": CLIPConfig(768, 224, 14, 1024, 24, 16, 49408, 77, 768, 12, 12, eos_id=49407),
    "vit_h16_unclip": CLIPConfig(1024, 256, 16, 1280, 32, 16, 49408, 77, 1024, 24, 16,
                                 eos_id=49407),
}


def eos_positions(tokens: jax.Array, eos_id: int, pad_id: int) -> jax.Array:
    """``[B]`` int: the first position holding ``eos_id``; without one, the last non-pad
    position (0 for an all-pad row)."""
    length = tokens.shape[1]
    is_eos = tokens == eos_id
    first_eos = jnp.argmax(is_eos, axis=1)
    non_pad = tokens != pad_id
    last_non_pad = length - 1 - jnp.argmax(non_pad[:, ::-1], axis=1)
    last_non_pad = jnp.where(non_pad.any(axis=1), last_non_pad, 0)
    return jnp.where(is_eos.any(axis=1), first_eos, last_non_pad)


class TextTransformer(nn.Module):
    """``[B, L]`` int tokens → (``[B, L, W]`` final-LN states, ``[B, E]`` EOS feature).

    Both outputs are float32; the EOS feature is projected but not normalised.
    """

    config: CLIPConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        if tokens.shape[1] > cfg.context_length:
            raise ValueError(f"{tokens.shape[1]} text tokens exceed context_length "
                             f"{cfg.context_length}")
        emb = nn.Embed(cfg.vocab_size, cfg.text_width, dtype=dt, name="token_embedding",
                       embedding_init=nn.with_logical_partitioning(
                           nn.initializers.normal(0.02), ("vocab", "embed")))
        pos = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), ("length", "embed")),
            (cfg.context_length, cfg.text_width))
        x = emb(tokens) + pos[: tokens.shape[1]].astype(dt)
        x = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio,
                        cfg.act, causal=True, dtype=dt, scan_layers=cfg.scan_layers,
                        remat=cfg.remat, name="transformer")(x)
        x = layer_norm(name="ln_final")(x)
        at_eos = jnp.take_along_axis(
            x, eos_positions(tokens, cfg.eos_id, cfg.pad_id)[:, None, None], axis=1)[:, 0]
        proj = self.param("text_projection", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.text_width ** -0.5), ("embed", None)),
            (cfg.text_width, cfg.embed_dim))
        return x, jnp.dot(at_eos, proj, precision=jax.lax.Precision.HIGHEST)


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class CLIP(nn.Module):
    """The two towers and the temperature. Embeddings are ``[B, E]`` float32, unit norm."""

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size "
                             f"{cfg.patch_size}")
        self.visual = VisionTransformer(
            cfg.patch_size, cfg.vision_width, cfg.vision_layers, cfg.vision_heads,
            cfg.embed_dim, cfg.mlp_ratio, cfg.act, dtype=to_dtype(cfg.dtype),
            scan_layers=cfg.scan_layers, remat=cfg.remat, stem_channels=tuple(cfg.vision_stem),
            colour_blocks=cfg.vision_colour_blocks)
        self.text = TextTransformer(cfg)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.init_logit_scale), ()), ())

    def encode_image(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] → ``[B, E]`` unit-norm float32."""
        return _normalize(self.visual(images)[1])

    def encode_text_tokens(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, L]`` int32 → (``[B, L, W]`` final-LN token states, ``[B, E]`` unit-norm)."""
        states, feat = self.text(tokens)
        return states, _normalize(feat)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """``[B, L]`` int32 → ``[B, E]`` unit-norm float32."""
        return self.encode_text_tokens(tokens)[1]

    def scale(self) -> jax.Array:
        """The temperature actually used: ``min(exp(logit_scale), max_logit_scale)``."""
        return jnp.minimum(jnp.exp(self.logit_scale), self.config.max_logit_scale)

    def __call__(self, images: jax.Array, tokens: jax.Array):
        """→ (image embeddings ``[B, E]``, text embeddings ``[B, E]``, scale ``[]``)."""
        return self.encode_image(images), self.encode_text(tokens), self.scale()


def dummy_inputs(cfg: CLIPConfig, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A zero batch with the model's input shapes (for ``init`` / ``eval_shape``)."""
    return {"image": np.zeros((batch_size, cfg.image_size, cfg.image_size, 3), np.float32),
            "tokens": np.zeros((batch_size, cfg.context_length), np.int32)}


# ----------------------------------------------------------------------------- loss


def _ambient_mesh(mesh):
    """The explicit mesh, else the one set by ``jax.set_mesh`` (None if there is none)."""
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract.empty else abstract


def _local_loss(img, txt, scale, offset, same=None):
    """Loss terms for local rows ``img``/``txt`` ``[b, E]`` against all ``[N, E]`` columns.

    ``img``/``txt`` are tuples (local, all); ``offset`` is the global index of local row 0;
    ``same`` (optional ``[b, N]`` bool, True on the diagonal) marks the positives of each row.
    Returns (i2t loss, t2i loss, i2t acc, t2i acc), each a mean over the local rows.
    """
    (img_local, img_all), (txt_local, txt_all) = img, txt
    labels = offset + jnp.arange(img_local.shape[0])
    if same is None:
        same = labels[:, None] == jnp.arange(img_all.shape[0])[None, :]
    target = same.astype(jnp.float32) / jnp.sum(same, axis=1, keepdims=True)
    hp = jax.lax.Precision.HIGHEST
    logits_i2t = scale * jnp.dot(img_local, txt_all.T, precision=hp)
    logits_t2i = scale * jnp.dot(txt_local, img_all.T, precision=hp)

    def ce(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.sum(target * logp, axis=1))

    def acc(logits):
        hit = jnp.take_along_axis(same, jnp.argmax(logits, axis=-1)[:, None], axis=1)[:, 0]
        return jnp.mean(hit.astype(jnp.float32))

    return ce(logits_i2t), ce(logits_t2i), acc(logits_i2t), acc(logits_t2i)


def contrastive_loss(img_emb: jax.Array, txt_emb: jax.Array, scale: jax.Array, mesh=None,
                     same: jax.Array | None = None):
    """Symmetric InfoNCE over the global batch: ``(loss, metrics)``, float32.

    Args:
      img_emb, txt_emb: ``[N, E]`` unit-norm embeddings, row i of each a matching pair.
      scale: the temperature (``exp(logit_scale)``, already clamped).
      same: optional ``[N, N]`` symmetric bool with a True diagonal: ``same[i, j]`` makes
        text j a positive of image i (and image j of text i), e.g. equal captions; the target
        of a row is uniform over its positives, and a top-1 hit is any positive. Default: the
        diagonal (standard CLIP).
      mesh: a ``("data", "fsdp", "model")`` mesh; default: the ambient ``jax.set_mesh``.
        When the batch axes (data × fsdp) have more than one shard, the loss runs under
        ``jax.shard_map``: each shard scores its rows against the all-gathered columns.
    Metrics: ``loss_i2t``, ``loss_t2i``, ``acc_i2t``, ``acc_t2i`` (top-1), ``scale``.
    """
    img_emb = img_emb.astype(jnp.float32)
    txt_emb = txt_emb.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    mesh = _ambient_mesh(mesh)
    axes = tuple(a for a in sharding.BATCH_AXES if mesh is not None and a in mesh.axis_names)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    if same is not None:
        same = jnp.asarray(same, bool)
        n = img_emb.shape[0]
        if same.shape != (n, n):
            raise ValueError(f"same must be [{n}, {n}] for a batch of {n}, got {same.shape}")
    if shards == 1:
        terms = _local_loss((img_emb, img_emb), (txt_emb, txt_emb), scale, 0, same)
    else:
        if img_emb.shape[0] % shards:
            raise ValueError(f"batch of {img_emb.shape[0]} does not split over the {shards} "
                             f"batch shards ({' × '.join(axes)}) of the mesh")

        def per_shard(img, txt, s, *rows):
            gather = lambda t: jax.lax.all_gather(t, axes, axis=0, tiled=True)  # noqa: E731
            offset = jax.lax.axis_index(axes) * img.shape[0]
            out = _local_loss((img, gather(img)), (txt, gather(txt)), s, offset, *rows)
            return tuple(jax.lax.pmean(t, axes) for t in out)

        extra = () if same is None else (same,)
        terms = jax.shard_map(per_shard, mesh=mesh,
                              in_specs=(P(axes), P(axes), P()) + (P(axes, None),) * len(extra),
                              out_specs=P())(img_emb, txt_emb, scale, *extra)
    loss_i2t, loss_t2i, acc_i2t, acc_t2i = terms
    loss = 0.5 * (loss_i2t + loss_t2i)
    return loss, {"loss": loss, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                  "acc_i2t": acc_i2t, "acc_t2i": acc_t2i, "scale": scale}


def loss_fn(model: CLIP, params, batch: dict, rng: jax.Array | None = None):
    """The train loop's hook: ``(loss, metrics)`` for a batch.

    ``params`` is the ``params`` collection; ``batch`` holds ``"image"`` ``[B, H, W, 3]``
    float32 in [-1, 1] and ``"tokens"`` ``[B, L]`` int32. ``rng`` is unused (CLIP has no
    dropout). The mesh, if any, comes from the ambient ``jax.set_mesh`` context. With
    ``config.shared_positives``, rows with identical tokens are each other's positives.
    """
    del rng
    img, txt, scale = model.apply({"params": params}, batch["image"], batch["tokens"])
    same = None
    if model.config.shared_positives:
        tokens = batch["tokens"]
        same = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)
    return contrastive_loss(img, txt, scale, same=same)


# ----------------------------------------------------------------------------- frozen CLIP


@struct.dataclass
class FrozenCLIP:
    """A trained CLIP as the fixed feature extractor every other model reads: the one adapter
    behind the decoder's conditioning, the embedding cache, CLIP score / FD_CLIP, zero-shot
    evaluation and the pipelines (shapes and converted Karlo weights alike).

    A pytree (params are leaves, the config is static), so it can be passed into ``jax.jit``
    as an argument or closed over. Gradients never flow into it (``stop_gradient``).
    Load a trained run's with :func:`unclip_jax.train.runs.load_clip`."""

    config: CLIPConfig = struct.field(pytree_node=False)
    params: Any

    @property
    def module(self) -> CLIP:
        return CLIP(self.config)

    def _at_clip_size(self, images: jax.Array) -> jax.Array:
        """float32 images resized (bilinear, antialiased when shrinking) to the CLIP's side."""
        s = self.config.image_size
        images = jnp.asarray(images, jnp.float32)
        if images.shape[1:3] != (s, s):
            images = jax.image.resize(images, (images.shape[0], s, s, images.shape[3]),
                                      method="linear")
        return images

    def embed_images(self, images: jax.Array, normalize: bool = True) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] → ``[B, E]`` unit-norm float32 (``normalize=False``:
        the projected feature before normalisation, what Karlo's decoder reads); images of
        another size are resized (bilinear, antialiased when shrinking) to the CLIP's
        resolution."""
        images = self._at_clip_size(images)
        feat = self.module.apply({"params": self.params}, images,
                                 method=lambda m, x: m.visual(x)[1])
        return jax.lax.stop_gradient(_normalize(feat) if normalize else feat.astype(jnp.float32))

    def image_patch_tokens(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] (resized as in :meth:`embed_images`) → the image tower's
        final-LN patch tokens on their grid, ``[B, g, g, vision_width]`` float32 (g = image
        side / patch size; the class token left out): what the decoder's representation
        alignment (``repa_weight``) reads."""
        images = self._at_clip_size(images)
        tokens = self.module.apply({"params": self.params}, images,
                                   method=lambda m, x: m.visual(x)[0])[:, 1:]
        g = self.config.image_size // self.config.patch_size
        return jax.lax.stop_gradient(tokens.reshape(images.shape[0], g, g, -1)
                                     .astype(jnp.float32))

    def encode_text(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """``[B, L]`` int32 → ``{"emb": [B, E]`` unit norm, ``"raw": [B, E]`` the projected EOS
        feature before normalisation (Karlo's ``text_embeds``), ``"states": [B, L, W]`` the
        final-LN token states, ``"valid": [B, L]`` positions up to each row's first EOS}``,
        float32 (bool for ``valid``)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        states, raw = self.module.apply({"params": self.params}, tokens,
                                        method=lambda m, t: m.text(t))
        last = eos_positions(tokens, self.config.eos_id, self.config.pad_id)
        valid = jnp.arange(tokens.shape[1])[None] <= last[:, None]
        return jax.lax.stop_gradient({"emb": _normalize(raw), "raw": raw.astype(jnp.float32),
                                      "states": states.astype(jnp.float32), "valid": valid})
