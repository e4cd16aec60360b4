"""DALL·E's discrete VAE (Ramesh et al. 2021, stage 1): images ↔ a grid of K-way codes.

Architecture (the paper's appendix A and OpenAI's released dVAE): a conv encoder of residual
groups, each group's blocks followed by a 2× max-pool except the last, ending in a 1×1 conv to
logits over the K codes of every grid cell; a conv decoder starting with a 1×1 conv from the
(one-hot or relaxed) K channels, groups of blocks each followed by 2× nearest upsampling
except the last, ending in a 1×1 conv to 6 channels: the logit-Laplace parameters (μ in logit
space and ln b, for each of the 3 colour channels). A residual block is
``x ↦ id(x) + post_gain · res(x)`` with ``post_gain = 1 / n_layers²`` (``n_layers`` = every
block of the stack), ``id`` a 1×1 conv when the width changes, and ``res`` four ReLU→conv
layers at a quarter of the output width (encoder 3×3,3×3,3×3,1×1; decoder 1×1,3×3,3×3,3×3).
With G groups the grid is ``image_size / 2^(G-1)`` (paper: 256 px, G=4 → 32×32, K=8192).
This is exactly the network of OpenAI's ``dall_e`` package (same kernels, gains, pooling and
upsampling), so its released weights load without approximation: ``unclip-jax convert dvae``
(:mod:`unclip_jax.pipelines.convert.dvae`; parity with ``dall_e`` in
``tests/test_convert_dvae.py``).

Objective (paper §3.1 and A.2), per image, in nats:
``NLL(x | decoder(z̃)) + β · KL(q(z|x) ‖ uniform)``, with z̃ a gumbel-softmax relaxed sample at
temperature τ; the likelihood is the logit-Laplace density of the pixels mapped into
``[ε, 1-ε]`` (ε = 0.1), the KL is summed over grid cells. We divide the sum by the number of
pixel values ``H·W·3`` (a per-dimension loss that keeps the learning rate independent of the
resolution; β keeps the paper's meaning: the weight of the summed KL against the summed NLL).
τ is annealed 1 → 1/16 and β ramped 0 → 6.6 with cosine schedules (the paper: over the first
150 000 and 5 000 updates). The loop passes no step to the loss, so the task's batches carry it:
``batch["step"]`` ``[B]`` int32, every row equal to the batch's stream position — which is the
update index, because the loop draws one batch per update and resumes the stream at the
checkpointed position (see :func:`with_step`).

Tokens at encode time are the argmax of the logits (no noise); decoding returns the mean of
the logit-Laplace distribution's ``sigmoid(μ)`` mapped back through the inverse ε map.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core.nn.layers import conv_general_dilated
from unclip_jax.core.nn.layers import dtype as to_dtype

SCHEDULES = ("cosine", "linear", "exponential")
LIKELIHOODS = ("logit_laplace", "gaussian")


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    """Sizes and objective of the dVAE. Defaults: a CPU-scale model for 32 px (8×8 grid)."""

    image_size: int = 32
    num_groups: int = 3             # G; the grid is image_size / 2^(G-1)
    blocks_per_group: int = 2
    encoder_width: int = 64         # width of the first encoder group; group g has 2^g × it
    decoder_width: int = 64         # width of the last decoder group; group g has 2^(G-1-g) ×
    decoder_init_width: int = 32    # width after the decoder's first 1×1 conv from K
    vocab_size: int = 512           # K codes
    dtype: str = "float32"          # compute dtype; logits, likelihood and losses are float32
    # objective
    eps: float = 0.1                # pixels x ∈ [0, 1] are modelled as (1 - 2ε) x + ε
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    tau_steps: int = 150_000
    tau_schedule: str = "cosine"    # one of SCHEDULES
    beta_max: float = 6.6
    beta_steps: int = 5_000
    beta_schedule: str = "cosine"   # one of SCHEDULES except "exponential" (it starts at 0)
    # Options for small / sparse data (defaults = the paper and the released network; see
    # experiments/shapes/dvae.py for why the shapes dVAE needs them).
    likelihood: str = "logit_laplace"   # one of LIKELIHOODS; "gaussian": fixed σ, mean sigmoid(μ)
    gaussian_sigma: float = 0.1     # σ of the "gaussian" likelihood on the ε-mapped pixels
    usage_weight: float = 0.0       # weight of KL(batch-average q ‖ uniform), summed over cells
    logit_scale: float = 1.0        # fixed factor on the encoder's logits
    code_init_std: float = 0.0      # > 0: N(0, σ²) init of the decoder's 1×1 conv from K codes

    @property
    def downsample(self) -> int:
        return 2 ** (self.num_groups - 1)

    @property
    def grid_size(self) -> int:
        return grid_size(self.image_size, self.num_groups)


# The released DALL·E dVAE: 256 px → 32×32 codes of 8192, n_hid 256, n_init 128, 4×2 blocks.
PRESETS = {
    "dalle": DVAEConfig(image_size=256, num_groups=4, blocks_per_group=2, encoder_width=256,
                        decoder_width=256, decoder_init_width=128, vocab_size=8192),
}


def grid_size(image_size: int, num_groups: int) -> int:
    """The side of the code grid, or a ValueError when the downsampling does not divide it."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    factor = 2 ** (num_groups - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"image size {image_size} is not divisible by the dVAE's downsampling factor "
            f"{factor} (= 2^(num_groups-1) with num_groups={num_groups}); use an image size "
            f"that is a multiple of {factor} or change num_groups")
    return image_size // factor


# ----------------------------------------------------------------------------- distributions


def map_pixels(x: jax.Array, eps: float = 0.1) -> jax.Array:
    """``[0, 1] → [ε, 1-ε]``: ``(1 - 2ε) x + ε`` (keeps the logit-Laplace away from 0 and 1)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(y: jax.Array, eps: float = 0.1) -> jax.Array:
    """Inverse of :func:`map_pixels`, clipped to [0, 1]."""
    return jnp.clip((y - eps) / (1 - 2 * eps), 0.0, 1.0)


def logit_laplace_log_prob(x: jax.Array, mu: jax.Array, log_b: jax.Array) -> jax.Array:
    """Log-density on (0, 1) of the logit-Laplace distribution (paper eq. 2), elementwise:

    ``f(x | μ, b) = exp(-|logit(x) - μ| / b) / (2 b x (1 - x))``, i.e. a Laplace(μ, b) in logit
    space pushed through the sigmoid. ``x`` in (0, 1); ``μ`` in logit space; ``b = exp(log_b)``.
    """
    x, mu, log_b = (jnp.asarray(a, jnp.float32) for a in (x, mu, log_b))
    logit = jnp.log(x) - jnp.log1p(-x)
    return (-jnp.abs(logit - mu) * jnp.exp(-log_b) - math.log(2.0) - log_b
            - jnp.log(x) - jnp.log1p(-x))


def gumbel_softmax(logits: jax.Array, key: jax.Array, tau) -> jax.Array:
    """Relaxed one-hot sample ``softmax((logits + g) / τ)``, g ~ Gumbel(0, 1) i.i.d., float32.

    As τ → 0 it approaches ``one_hot(argmax(logits + g))`` for the same key.
    """
    logits = logits.astype(jnp.float32)
    g = jax.random.gumbel(key, logits.shape, jnp.float32)
    return jax.nn.softmax((logits + g) / tau, axis=-1)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """``KL(softmax(logits) ‖ uniform over K) = log K - H(q)`` over the last axis, float32."""
    logits = logits.astype(jnp.float32)
    logq = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(logq) * logq, axis=-1) + math.log(logits.shape[-1])


def gaussian_log_prob(x: jax.Array, mu: jax.Array, sigma: float) -> jax.Array:
    """Log-density of ``N(sigmoid(μ), σ²)`` at ``x``, elementwise, float32 (the ``gaussian``
    likelihood: a fixed-σ squared error on the ε-mapped pixels, ``μ`` in logit space)."""
    x, mu = jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32)
    return (-0.5 * jnp.square((x - jax.nn.sigmoid(mu)) / sigma)
            - math.log(sigma) - 0.5 * math.log(2 * math.pi))


def pixel_log_prob(x: jax.Array, stats: jax.Array, cfg: "DVAEConfig") -> jax.Array:
    """``[..., 3]`` log-likelihood of mapped pixels ``x`` under ``[..., 6]`` decoder statistics
    with ``cfg.likelihood`` (the gaussian ignores the ln b channels)."""
    if cfg.likelihood == "logit_laplace":
        return logit_laplace_log_prob(x, stats[..., :3], stats[..., 3:])
    if cfg.likelihood == "gaussian":
        if cfg.gaussian_sigma <= 0:
            raise ValueError(f"gaussian_sigma must be > 0, got {cfg.gaussian_sigma}")
        return gaussian_log_prob(x, stats[..., :3], cfg.gaussian_sigma)
    raise ValueError(f"unknown likelihood {cfg.likelihood!r}; accepted: "
                     f"{', '.join(LIKELIHOODS)}")


def usage_kl(logits: jax.Array) -> jax.Array:
    """``KL(q̄ ‖ uniform)`` of the average ``q̄`` of ``softmax(logits)`` over every cell of the
    batch (a scalar): 0 when the batch spreads its codes evenly over the K, log K when every
    cell puts its mass on the same code. Unlike the per-cell KL it does not ask any single
    cell to be uncertain, only the codebook as a whole to be used."""
    k = logits.shape[-1]
    avg = jax.nn.softmax(logits.reshape(-1, k).astype(jnp.float32), axis=-1).mean(0)
    return jnp.sum(avg * jnp.log(jnp.maximum(avg, 1e-30))) + math.log(k)


def _ramp(step, steps: int, kind: str):
    """Progress in [0, 1] shaped by ``kind`` (``linear`` or the half-cosine ``cosine``)."""
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return 0.5 * (1 - jnp.cos(jnp.pi * t)) if kind == "cosine" else t


def tau_at(step, cfg: DVAEConfig) -> jax.Array:
    """Relaxation temperature at update ``step``: ``tau_start`` → ``tau_end`` over
    ``tau_steps``, constant after. ``exponential`` interpolates log τ linearly."""
    if cfg.tau_schedule not in SCHEDULES:
        raise ValueError(f"unknown tau_schedule {cfg.tau_schedule!r}; accepted: "
                         f"{', '.join(SCHEDULES)}")
    if cfg.tau_schedule == "exponential":
        t = _ramp(step, cfg.tau_steps, "linear")
        return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** t
    return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * _ramp(step, cfg.tau_steps,
                                                                 cfg.tau_schedule)


def beta_at(step, cfg: DVAEConfig) -> jax.Array:
    """KL weight at update ``step``: 0 → ``beta_max`` over ``beta_steps``, constant after."""
    if cfg.beta_schedule not in ("cosine", "linear"):
        raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; accepted: cosine, "
                         f"linear")
    return cfg.beta_max * _ramp(step, cfg.beta_steps, cfg.beta_schedule)


# ----------------------------------------------------------------------------- modules


def _conv(features: int, kernel: int, dtype, name: str, in_axis: str = "conv_in",
          out_axis: str = "conv_out", init_std: float = 0.0) -> nn.Conv:
    """A 'SAME' conv with fan-in normal init (the release's), kernel ``[k, k, in, out]``;
    ``init_std > 0`` draws the kernel from N(0, init_std²) instead. The kernel's FSDP shards
    (``conv_in``) are gathered before the conv, and a 1×1 conv runs as a matmul: see
    :func:`unclip_jax.core.nn.layers.conv_general_dilated`."""
    init = (nn.initializers.normal(init_std) if init_std > 0
            else nn.initializers.variance_scaling(1.0, "fan_in", "normal"))
    compute_in = None if in_axis == "conv_in" else in_axis
    return nn.Conv(
        features, (kernel, kernel), padding="SAME", dtype=dtype, param_dtype=jnp.float32,
        name=name,
        kernel_init=nn.with_logical_partitioning(init, (None, None, in_axis, out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
        conv_general_dilated=conv_general_dilated((None, None, compute_in, out_axis)))


class ResBlock(nn.Module):
    """``[B, H, W, C_in] → [B, H, W, features]``: ``id(x) + post_gain · res(x)``.

    ``res`` is ReLU→conv ×4 at ``features // 4`` hidden channels with the given kernel sizes.
    """

    features: int
    kernels: tuple[int, ...]
    post_gain: float
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = max(1, self.features // 4)
        identity = x
        if x.shape[-1] != self.features:
            identity = _conv(self.features, 1, self.dtype, "id_path")(x)
        h = x
        for i, k in enumerate(self.kernels):
            out = self.features if i == len(self.kernels) - 1 else hidden
            h = _conv(out, k, self.dtype, f"conv_{i}")(nn.relu(h))
        y = identity + self.post_gain * h
        return nn.with_logical_constraint(y, ("batch", "height", "width", "act_embed"))


class Encoder(nn.Module):
    """``[B, H, W, 3]`` mapped pixels in [ε, 1-ε] → ``[B, H/f, W/f, K]`` float32 logits."""

    config: DVAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        gain = 1.0 / (cfg.num_groups * cfg.blocks_per_group) ** 2
        h = _conv(cfg.encoder_width, 7, dt, "input")(x.astype(dt))
        for g in range(cfg.num_groups):
            for b in range(cfg.blocks_per_group):
                h = ResBlock(cfg.encoder_width * 2 ** g, (3, 3, 3, 1), gain, dt,
                             name=f"group_{g}_block_{b}")(h)
            if g < cfg.num_groups - 1:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
        logits = _conv(cfg.vocab_size, 1, dt, "output", out_axis="vocab")(nn.relu(h))
        logits = logits.astype(jnp.float32) * cfg.logit_scale
        return nn.with_logical_constraint(logits,
                                          ("batch", "height", "width", "vocab"))


class Decoder(nn.Module):
    """``[B, h, w, K]`` one-hot / relaxed codes → ``[B, h·f, w·f, 6]`` float32 statistics:
    ``[..., :3]`` μ (logit space), ``[..., 3:]`` ln b of the logit-Laplace per channel."""

    config: DVAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        gain = 1.0 / (cfg.num_groups * cfg.blocks_per_group) ** 2
        h = _conv(cfg.decoder_init_width, 1, dt, "input", in_axis="vocab",
                  init_std=cfg.code_init_std)(z.astype(dt))
        for g in range(cfg.num_groups):
            width = cfg.decoder_width * 2 ** (cfg.num_groups - 1 - g)
            for b in range(cfg.blocks_per_group):
                h = ResBlock(width, (1, 3, 3, 3), gain, dt, name=f"group_{g}_block_{b}")(h)
            if g < cfg.num_groups - 1:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)   # nearest 2× upsampling
        return _conv(6, 1, dt, "output")(nn.relu(h)).astype(jnp.float32)


class DVAE(nn.Module):
    """Encoder + decoder. ``__call__(images, z)`` (used by ``init``) runs both: images
    ``[B, H, W, 3]`` in [-1, 1] and codes ``z`` ``[B, h, w, K]`` → (logits, statistics)."""

    config: DVAEConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def _check(self, images: jax.Array) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
        for side in images.shape[1:3]:
            grid_size(side, self.config.num_groups)

    def encode_logits(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] → ``[B, h, w, K]`` float32 logits of q(z | x)."""
        self._check(images)
        x = map_pixels((images.astype(jnp.float32) + 1) / 2, self.config.eps)
        return self.encoder(x)

    def decode_stats(self, z: jax.Array) -> jax.Array:
        """``[B, h, w, K]`` codes → ``[B, H, W, 6]`` logit-Laplace statistics (μ, ln b)."""
        if z.shape[-1] != self.config.vocab_size:
            raise ValueError(f"codes must have {self.config.vocab_size} channels (vocab_size), "
                             f"got shape {z.shape}")
        return self.decoder(z)

    def __call__(self, images: jax.Array, z: jax.Array | None = None):
        logits = self.encode_logits(images)
        if z is None:
            z = jax.nn.one_hot(jnp.argmax(logits, -1), self.config.vocab_size)
        return logits, self.decode_stats(z)


# ----------------------------------------------------------------------------- pure API


# XLA:CPU fuses convolutions through YNNPACK by default; on this wide conv stack (256–2048
# channels at paper scale) that is ~15 % slower than its plain conv kernels (paper encoder, 2
# cores: 0.98 → 0.84 s), while the narrower U-Nets gain from it. XLA flags are per process, so
# the dVAE's own jitted forwards pass the switch as a per-compilation option instead.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=1)
def compiler_options() -> dict | None:
    """``_CPU_OPTIONS`` on a CPU backend whose XLA knows them, else None (plain ``jax.jit``)."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 — an XLA without the option: keep its defaults
        return None
    return _CPU_OPTIONS


def jit(fn, **kwargs):
    """``jax.jit`` for dVAE forwards: on CPU compiled without the YNNPACK conv fusions (see
    ``_CPU_OPTIONS``); numerics are those of ``jax.jit`` (tested to float32 round-off)."""
    options = compiler_options()
    if options is not None:
        kwargs.setdefault("compiler_options", options)
    return jax.jit(fn, **kwargs)


def encode(model: DVAE, params, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` in [-1, 1] → ``[B, h, w]`` int32 tokens: argmax of the logits, no noise."""
    logits = model.apply({"params": params}, images, method=DVAE.encode_logits)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def decode(model: DVAE, params, tokens: jax.Array) -> jax.Array:
    """``[B, h, w]`` int tokens → ``[B, H, W, 3]`` images in [-1, 1]: the distribution's
    ``sigmoid(μ)`` mapped back through the inverse ε map, clipped."""
    z = jax.nn.one_hot(tokens, model.config.vocab_size, dtype=jnp.float32)
    stats = model.apply({"params": params}, z, method=DVAE.decode_stats)
    return stats_to_images(stats, model.config.eps)


def stats_to_images(stats: jax.Array, eps: float) -> jax.Array:
    """``[B, H, W, 6]`` statistics → ``[B, H, W, 3]`` mean images in [-1, 1]."""
    return unmap_pixels(jax.nn.sigmoid(stats[..., :3]), eps) * 2 - 1


def code_usage(logits: jax.Array) -> dict[str, jax.Array]:
    """Codebook statistics of ``[..., K]`` logits: ``perplexity`` = exp(entropy) of the average
    q(z | x) over all cells (K when every code is used evenly, 1 when one code is), and
    ``used_fraction`` = fraction of the K codes that are some cell's argmax."""
    k = logits.shape[-1]
    q = jax.nn.softmax(logits.reshape(-1, k).astype(jnp.float32), axis=-1)
    avg = q.mean(0)
    perplexity = jnp.exp(-jnp.sum(avg * jnp.log(jnp.maximum(avg, 1e-30))))
    counts = jnp.zeros(k, jnp.int32).at[jnp.argmax(q, -1)].add(1)
    return {"perplexity": perplexity, "used_fraction": jnp.mean(counts > 0)}


def psnr(mse) -> jax.Array:
    """PSNR in dB of a mean squared error on [0, 1] pixels."""
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def loss_fn(model: DVAE, params, batch: dict, rng: jax.Array):
    """Negative ELBO per pixel value (with β on the KL) of ``batch["image"]`` ``[B, H, W, 3]``
    in [-1, 1] at update ``max(batch["step"])``, plus ``usage_weight`` × cells ×
    :func:`usage_kl` of the batch (0 by default). Returns ``(loss, metrics)``."""
    cfg = model.config
    images = batch["image"]
    step = jnp.max(batch["step"])
    tau, beta = tau_at(step, cfg), beta_at(step, cfg)
    x = map_pixels((images.astype(jnp.float32) + 1) / 2, cfg.eps)

    logits = model.apply({"params": params}, images, method=DVAE.encode_logits)
    z = gumbel_softmax(logits, rng, tau)
    stats = model.apply({"params": params}, z, method=DVAE.decode_stats)
    log_p = pixel_log_prob(x, stats, cfg)
    dims = images.shape[1] * images.shape[2] * images.shape[3]
    cells = logits.shape[1] * logits.shape[2]
    nll = -jnp.sum(log_p, axis=(1, 2, 3))                     # [B], nats per image
    kl = jnp.sum(kl_to_uniform(logits), axis=(1, 2))          # [B], nats per image
    usage = usage_kl(logits)
    loss = (jnp.mean(nll + beta * kl) + cfg.usage_weight * cells * usage) / dims
    recon01 = (stats_to_images(stats, cfg.eps) + 1) / 2
    mse = jnp.mean(jnp.square(recon01 - (images.astype(jnp.float32) + 1) / 2))
    stats_usage = code_usage(logits)
    metrics = {"nll_per_dim": jnp.mean(nll) / dims, "kl_per_cell": jnp.mean(kl) / cells,
               "usage_kl": usage, "tau": tau, "beta": beta, "relaxed_mse": mse,
               "relaxed_psnr": psnr(mse), "perplexity": stats_usage["perplexity"],
               "used_fraction": stats_usage["used_fraction"]}
    return loss, metrics


def dummy_inputs(cfg: DVAEConfig, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A zero batch fixing the shapes: ``image`` ``[B, S, S, 3]`` and ``step`` ``[B]``."""
    return {"image": np.zeros((batch_size, cfg.image_size, cfg.image_size, 3), np.float32),
            "step": np.zeros((batch_size,), np.int32)}


# ----------------------------------------------------------------------------- training task


def with_step(position: int, raw: dict) -> dict:
    """The dVAE's batch: ``image`` plus ``step`` ``[B]`` int32 = the update the batch feeds
    (the τ and β schedules read it; ``[B]`` so it shards like every other batch entry)."""
    return {"image": np.asarray(raw["image"], np.float32),
            "step": np.full((len(raw["image"]),), position, np.int32)}


