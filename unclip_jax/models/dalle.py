"""The DALL·E transformer (Ramesh et al. 2021, stage 2): one causal stream of text then image.

Sequence (``T = L + n``, ``L`` = ``text_length``, ``n = g·g`` image tokens of a ``g × g`` dVAE
grid in raster order)::

    [ text_0 … text_{L-1} | image_0 … image_{n-1} ]

Token ids of the stream live in one vocabulary of ``V = V_text + K``: text ids as the tokenizer
writes them (BOS … EOS, then ``pad_id``), image code ``k`` as ``V_text + k``. The output layer
covers all ``V`` ids, and every logit row is restricted (set to ``ar.NEG_INF``) to the
vocabulary of the token it predicts: row ``t`` predicts position ``t + 1``, a text token when
``t + 1 < L``, an image code otherwise. So the loss is a softmax over the right vocabulary and
:func:`unclip_jax.core.ar.generate` can only ever sample image codes at image positions (no
``vocab_mask`` is needed; the restriction is part of the model).

Embeddings (paper §2.2 and appendix B.1): separate token tables for text and image; text
positions get a learned position embedding ``[L, W]``; image positions get a row embedding plus
a column embedding (``[g, W]`` each). Padding: "we learn a special padding token separately for
each of the 256 text positions. This padding token is used only when no text token is
available" (paper, B.1; it replaces masking padded keys out of attention). Here a text position
holding ``pad_id`` takes row ``p`` of a ``[L, W]`` padding table instead of the embedding of the
pad id, so the padding embedding depends on its position. A dropped caption (classifier-free
guidance) is the same thing for every text position, BOS included: the caption is absent, so
the whole text prefix is the padding tokens.

Loss (paper §2.2): "We normalize the cross-entropy losses for the text and image tokens by the
total number of each kind in a batch of data … we multiply the cross-entropy loss for the text
by 1/8 and the cross-entropy loss for the image by 7/8". The paper does not say whether padding
positions are targets of the text loss; it counts "text tokens", and a padding token is the
absence of one. Our rule: the text loss is over the targets at text positions 1 … L-1 that are
real tokens (caption pieces and EOS; BOS at position 0 is given, never predicted); padding
targets and every text target of a dropped caption are excluded. The image loss is over all
``n`` image codes (the first is predicted from the last text position). Each is a mean over
its own count in the batch; ``loss = w·text + (1 - w)·image`` with ``w = text_loss_weight``.

Attention (paper appendix B.1, Fig. 11), boolean ``[T, T]`` masks (True = query may attend),
always causal; text keys are visible to every later query (text queries are plain causal).
Between image tokens ``p`` (query) and ``p' ≤ p`` (key), raster indices:

* ``full``   every earlier image token;
* ``row``    the previous ``g + 1`` tokens in raster order, ``p - p' ≤ g`` (the paper's "row
  attention … extent chosen to be w + 1 so that the last token being attended to is the one in
  the same column of the previous row");
* ``column`` the same column, ``(p - p') mod g = 0``;
* ``conv``   a causal ``k × k`` neighbourhood with wraparound (offsets taken in raster order,
  as the row mask does): ``p' = p + dr·g + dc`` with ``dr ∈ [-a, 0]``, ``dc ∈ [-a, a]``,
  ``a = (k-1)/2``, and ``dc ≤ 0`` when ``dr = 0`` (paper: 11 × 11; ``conv_kernel``).

``attention`` is one kind for every layer, a comma-separated list with one kind per layer, or
``"paper"``: row attention except every fourth layer column attention, and the last layer
conv (the paper's 64-layer layout scaled to ``depth``). Consecutive layers of one kind form
one :class:`~unclip_jax.core.nn.transformer.Transformer` stack (so ``scan_layers`` scans each run).

The frozen dVAE turns images into codes inside the input iterator (one jitted encode per batch,
outside the gradient), not in a pre-encoded cache: the shapes data are infinite-ish and cheap
to encode, and the data position stays the one of ``input_pipeline``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax.core import ar, sharding
from unclip_jax.core.images import to_uint8
from unclip_jax.core.nn.layers import dtype as to_dtype
from unclip_jax.core.nn.layers import layer_norm
from unclip_jax.core.nn.transformer import Transformer

MASK_KINDS = ("full", "row", "column", "conv")


@dataclasses.dataclass(frozen=True)
class DalleConfig:
    """Sizes of the DALL·E transformer. ``text_vocab_size``, ``image_vocab_size``,
    ``text_length`` and ``grid_size`` are set by the DALL·E task (``train/tasks/dalle.py``)
    from the tokenizer, the dVAE and the data config (paper: 16384, 8192, 256, 32)."""

    text_vocab_size: int = 512      # V_text (tokenizer)
    image_vocab_size: int = 512     # K (dVAE codes)
    text_length: int = 24           # L (data.context_length)
    grid_size: int = 8              # g; n = g·g image tokens
    pad_id: int = 0                 # tokenizer padding id (replaced by per-position padding)
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    attention: str = "full"         # one of MASK_KINDS, "k1,k2,…" per layer, or "paper"
    conv_kernel: int = 3            # k of the conv mask (odd; paper 11)
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    caption_dropout: float = 0.1    # P(caption → padding tokens) in training, for guidance
    text_loss_weight: float = 1 / 8  # paper: 1/8 text, 7/8 image
    dvae_workdir: str = "runs/demo/dvae"   # the frozen dVAE (a `unclip-jax train` workdir)
    clip_workdir: str = ""          # default CLIP for reranking (sample-dalle, evaluation)

    @property
    def image_length(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def seq_length(self) -> int:
        """T = L + g·g."""
        return self.text_length + self.image_length

    @property
    def vocab_size(self) -> int:
        """V = V_text + K (image code k is stream id V_text + k)."""
        return self.text_vocab_size + self.image_vocab_size


# ----------------------------------------------------------------------------- masks


def layer_kinds(cfg: DalleConfig) -> tuple[str, ...]:
    """The mask kind of each of the ``depth`` layers (see the module docstring)."""
    if cfg.attention == "paper":
        kinds = ["column" if i % 4 == 1 else "row" for i in range(cfg.depth)]
        kinds[-1] = "conv"
        return tuple(kinds)
    kinds = tuple(k.strip() for k in cfg.attention.split(","))
    if len(kinds) == 1:
        kinds = kinds * cfg.depth
    bad = [k for k in kinds if k not in MASK_KINDS]
    if bad or len(kinds) != cfg.depth:
        raise ValueError(f"attention={cfg.attention!r}: give one of {', '.join(MASK_KINDS)}, "
                         f"'paper', or a comma-separated list of {cfg.depth} of them (depth)")
    return kinds


def attention_mask(kind: str, text_length: int, grid_size: int,
                   conv_kernel: int = 3) -> np.ndarray:
    """``[T, T]`` bool mask of one kind (True = query row may attend to key column)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; accepted: {', '.join(MASK_KINDS)}")
    if conv_kernel < 1 or conv_kernel % 2 == 0 or conv_kernel // 2 >= grid_size:
        raise ValueError(f"conv_kernel must be odd with (k-1)/2 < grid_size {grid_size}, got "
                         f"{conv_kernel}")
    big_l, g = text_length, grid_size
    t = big_l + g * g
    q = np.arange(t)[:, None]
    k = np.arange(t)[None, :]
    d = q - k                                   # raster distance between image tokens
    if kind == "full":
        image_rule = np.ones((t, t), bool)
    elif kind == "row":
        image_rule = d <= g
    elif kind == "column":
        image_rule = d % g == 0
    else:
        a = conv_kernel // 2
        offsets = [-(dr * g + dc) for dr in range(-a, 1) for dc in range(-a, a + 1)
                   if dr < 0 or dc <= 0]
        image_rule = np.isin(d, offsets)
    image_pair = (q >= big_l) & (k >= big_l)
    return (d >= 0) & ((k < big_l) | (image_pair & image_rule))


# ----------------------------------------------------------------------------- model


def _table(module: nn.Module, name: str, shape: tuple[int, int], names: tuple, std: float):
    return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(std), names),
                        shape)


class DalleTransformer(nn.Module):
    """Stream tokens → next-token logits.

    ``__call__(tokens, cond=None, prefill=True)``:
      tokens: ``[B, n]`` int32 stream ids (see the module docstring); in training the whole
        stream from position 0 (``n ≤ T``), in decode mode the text prompt (``prefill``) and
        then one image token per call.
      cond: ``None`` or ``{"keep": [B] bool}``; False = caption dropped (every text position
        becomes its padding token).
      prefill: decode mode only: this call starts the sequence at position 0.
    Returns ``[B, n, V]`` float32 logits, restricted to the predicted token's vocabulary.
    """

    config: DalleConfig
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, cond: dict | None = None,
                 prefill: bool = True) -> jax.Array:
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        big_l, g, vt, total = cfg.text_length, cfg.grid_size, cfg.text_vocab_size, cfg.seq_length
        batch, n = tokens.shape
        keep = None if cond is None else cond.get("keep")
        keep = jnp.ones((batch,), jnp.bool_) if keep is None else keep.astype(jnp.bool_)

        start = 0
        if self.decode:
            initialised = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            start = 0 if prefill else position.value
            if initialised:
                position.value = start + n
        elif n > total:
            raise ValueError(f"{n} tokens exceed the stream length T = {total}")
        pos = start + jnp.arange(n)                                      # [n]
        is_text = pos < big_l

        text_tab = _table(self, "text_embedding", (vt, cfg.width), ("vocab", "embed"), 0.02)
        pad_tab = _table(self, "text_padding_embedding", (big_l, cfg.width),
                         ("length", "embed"), 0.02)
        text_pos = _table(self, "text_position_embedding", (big_l, cfg.width),
                          ("length", "embed"), 0.01)
        image_tab = _table(self, "image_embedding", (cfg.image_vocab_size, cfg.width),
                           ("vocab", "embed"), 0.02)
        row_tab = _table(self, "image_row_embedding", (g, cfg.width), ("length", "embed"), 0.01)
        col_tab = _table(self, "image_column_embedding", (g, cfg.width), ("length", "embed"),
                         0.01)

        tpos = jnp.clip(pos, 0, big_l - 1)
        is_pad = is_text[None] & ((tokens == cfg.pad_id) | ~keep[:, None])           # [B, n]
        text_x = jnp.where(is_pad[..., None], pad_tab[tpos][None],
                           text_tab[jnp.clip(tokens, 0, vt - 1)]) + text_pos[tpos][None]
        ipos = jnp.clip(pos - big_l, 0, cfg.image_length - 1)
        image_x = (image_tab[jnp.clip(tokens - vt, 0, cfg.image_vocab_size - 1)]
                   + (row_tab[ipos // g] + col_tab[ipos % g])[None])
        x = jnp.where(is_text[None, :, None], text_x, image_x).astype(dt)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        kinds = layer_kinds(cfg)
        for i, (kind, run) in enumerate(itertools.groupby(kinds)):
            full = jnp.asarray(attention_mask(kind, big_l, g, cfg.conv_kernel))
            if self.decode:      # query rows start … start+n-1 against the whole cache
                mask = jax.lax.dynamic_slice_in_dim(full, start, n, axis=0)
            else:
                mask = full[:n, :n]
            x = Transformer(cfg.width, len(list(run)), cfg.num_heads, cfg.mlp_ratio, cfg.act,
                            causal=True, dtype=dt, scan_layers=cfg.scan_layers,
                            remat=cfg.remat, decode=self.decode,
                            name=f"layers_{i}")(x, mask[None, None])
        x = layer_norm(name="ln_final")(x)
        logits = nn.Dense(cfg.vocab_size, dtype=jnp.float32, name="head", kernel_init=(
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab"))),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))(
            x.astype(jnp.float32))
        predicts_text = (pos + 1 < big_l)[:, None]                         # [n, 1]
        is_text_id = (jnp.arange(cfg.vocab_size) < vt)[None, :]            # [1, V]
        logits = jnp.where((predicts_text == is_text_id)[None], logits, ar.NEG_INF)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def dummy_inputs(cfg: DalleConfig, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A zero batch with the training shapes: ``text`` ``[B, L]``, ``image_tokens`` ``[B, n]``."""
    return {"text": np.zeros((batch_size, cfg.text_length), np.int32),
            "image_tokens": np.zeros((batch_size, cfg.image_length), np.int32)}


def stream(cfg: DalleConfig, text: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """``[B, T]`` stream ids from ``text`` ``[B, L]`` and image codes ``[B, n]`` (or
    ``[B, g, g]``) in ``[0, K)``."""
    image_tokens = image_tokens.reshape(image_tokens.shape[0], -1)
    return jnp.concatenate([text.astype(jnp.int32),
                            image_tokens.astype(jnp.int32) + cfg.text_vocab_size], axis=1)


def loss_fn(model: DalleTransformer, params, batch: dict, rng: jax.Array | None = None):
    """``(loss, metrics)`` of a batch (``text`` ``[B, L]``, ``image_tokens`` ``[B, n]``): the
    weighted text/image cross-entropy of the module docstring, captions dropped with
    ``caption_dropout`` when ``rng`` is given."""
    cfg = model.config
    text = batch["text"]
    keep = jnp.ones(text.shape[:1], jnp.bool_)
    if rng is not None and cfg.caption_dropout > 0:
        keep = jax.random.uniform(rng, text.shape[:1]) >= cfg.caption_dropout
    seq = stream(cfg, text, batch["image_tokens"])
    logits = model.apply({"params": params}, seq[:, :-1], {"keep": keep})
    targets = seq[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)          # [B, T-1]
    big_l = cfg.text_length
    text_ce, image_ce = ce[:, :big_l - 1], ce[:, big_l - 1:]
    counted = (targets[:, :big_l - 1] != cfg.pad_id) & keep[:, None]
    text_loss = jnp.sum(jnp.where(counted, text_ce, 0.0)) / jnp.maximum(jnp.sum(counted), 1)
    image_loss = jnp.mean(image_ce)
    w = cfg.text_loss_weight
    loss = w * text_loss + (1 - w) * image_loss
    image_acc = jnp.mean(jnp.argmax(logits[:, big_l - 1:], -1) == targets[:, big_l - 1:])
    return loss, {"text_loss": text_loss, "image_loss": image_loss,
                  "image_accuracy": image_acc, "kept_fraction": jnp.mean(keep)}


# ----------------------------------------------------------------------------- sampling


@functools.lru_cache(maxsize=None)
def ar_model(cfg: DalleConfig) -> ar.ARModel:
    """The decode-mode model for :func:`unclip_jax.core.ar.generate` (one object per config, so
    generate's compilation cache hits across calls)."""
    def example(b):
        return (jnp.zeros((b, cfg.seq_length), jnp.int32), {"keep": jnp.ones((b,), jnp.bool_)})
    return ar.linen_model(DalleTransformer(cfg, decode=True), example)


def sample(cfg: DalleConfig, params, text: jax.Array, rng: jax.Array, *,
           guidance_scale: float | jax.Array = 1.0, guided: bool | None = None,
           temperature: float | jax.Array = 1.0, top_k: int | jax.Array = 0,
           top_p: float | jax.Array = 1.0, return_logits: bool = False):
    """Image codes ``[B, g, g]`` in ``[0, K)`` for ``text`` ``[B, L]`` token ids (one jitted
    :func:`ar.generate`: the text is prefilled, then ``g·g`` tokens are drawn with the KV cache).

    Guidance runs the unconditional stream (caption → padding tokens) in the same batch when
    ``guided`` (default: ``guidance_scale != 1`` for a Python number; pass ``guided=True`` to
    trace the scale). ``temperature`` ≤ 0 is greedy. With ``return_logits`` also the guided
    logits over the image vocabulary ``[B, n, K]``. Callable inside ``jax.jit``.
    """
    if guided is None:
        guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0)
    b = text.shape[0]
    cond = {"keep": jnp.ones((b,), jnp.bool_)}
    uncond = {"keep": jnp.zeros((b,), jnp.bool_)} if guided else None
    out = ar.generate(ar_model(cfg), params, text.astype(jnp.int32), rng,
                      num_tokens=cfg.image_length, cond=cond, uncond=uncond,
                      guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                      top_p=top_p, return_logits=return_logits)
    tokens, logits = out if return_logits else (out, None)
    codes = (tokens - cfg.text_vocab_size).reshape(b, cfg.grid_size, cfg.grid_size)
    if return_logits:
        return codes, logits[..., cfg.text_vocab_size:]
    return codes


@functools.partial(jax.jit, static_argnames=("cfg", "return_logits"))
def sample_uncached(cfg: DalleConfig, params, text: jax.Array, rng: jax.Array, *,
                    temperature=1.0, top_k=0, top_p=1.0, return_logits: bool = False):
    """Reference sampler without a KV cache: every step recomputes the full (training-mode)
    model on the ``T - 1`` stream buffer (causal, so the unfilled tail is never seen) and reads
    the logits of the last filled position. Same keys as :func:`sample` (position i draws with
    ``fold_in(rng, i)``), so equal logits give equal samples. No guidance. For tests and the
    speed benchmark."""
    model = DalleTransformer(cfg)
    b, big_l, n = text.shape[0], cfg.text_length, cfg.image_length
    buf = jnp.zeros((b, cfg.seq_length - 1), jnp.int32).at[:, :big_l].set(text)

    def body(i, carry):
        buf, codes, logits_out = carry
        logits = model.apply({"params": params}, buf)
        row = jax.lax.dynamic_index_in_dim(logits, big_l - 1 + i, axis=1, keepdims=False)
        tok = ar.sample_token(jax.random.fold_in(rng, i), row, temperature, top_k, top_p)
        buf = jax.lax.dynamic_update_index_in_dim(
            buf, tok, jnp.minimum(big_l + i, cfg.seq_length - 2), axis=1)
        return (buf, codes.at[:, i].set(tok), logits_out.at[:, i].set(row))

    init = (buf, jnp.zeros((b, n), jnp.int32),
            jnp.zeros((b, n, cfg.vocab_size), jnp.float32))
    _, tokens, logits = jax.lax.fori_loop(0, n, body, init)
    codes = (tokens - cfg.text_vocab_size).reshape(b, cfg.grid_size, cfg.grid_size)
    return (codes, logits[..., cfg.text_vocab_size:]) if return_logits else codes


# ----------------------------------------------------------------------------- loading


# ----------------------------------------------------------------------------- training task


def heldout_prompts(num_prompts: int, seed: int = 0) -> list[str]:
    """Captions of held-out single-object test scenes (every one a held-out colour+shape)."""
    from unclip_jax.core import shapes

    return [shapes.caption(shapes.sample_scene(seed, i, "test", num_objects=1))
            for i in range(num_prompts)]


def shapes_accuracy(cfg: DalleConfig, params, tok, dvae_model, dvae_params, *,
                    num_prompts: int = 32, seed: int = 0, **settings) -> dict:
    """Fraction of samples (one per held-out single-object prompt) whose judged colour and
    shape match the caption."""
    from unclip_jax.core import shapes
    from unclip_jax.models import dvae as dvae_lib

    prompts = heldout_prompts(num_prompts)
    text = jnp.asarray(tok.encode(prompts, cfg.text_length))
    codes = sharding.fetch(sample(cfg, params, text, jax.random.PRNGKey(seed), **settings))
    images = sharding.fetch(dvae_lib.jit(lambda c: dvae_lib.decode(dvae_model, dvae_params, c))(
        codes))
    pixels = to_uint8(images)
    ok = [all(shapes.score_caption(im, p)["colour_shape_correct"])
          for im, p in zip(pixels, prompts)]
    return {"test_colour_shape": float(np.mean(ok))}
