"""unCLIP image manipulations on the bipartite latent ``(z_i, x_T)`` (Ramesh et al. 2022, §3).

An image ``x`` (a PNG/JPEG path, encoded bytes, a PIL image of any size and mode, or a uint8
array; resized and centre-cropped to the decoder's resolution) is encoded as

* ``z_i`` ``[E]``: its unit-norm CLIP image embedding;
* ``x_T`` ``[S, S, 3]``: the DDIM inversion of the decoder conditioned on ``z_i``
  (:func:`unclip_jax.diffusion.ddim_invert` on a *strided* "ddimN" schedule — the evenly spaced
  one ends at t ≈ T−1 where ᾱ ≈ 0 and the fixed point barely converges — with fixed-point
  refinement).

Decoding ``(z_i, x_T)`` with DDIM η = 0 on the same schedule reconstructs ``x``
(:func:`reconstruct`). The manipulations:

* :func:`variations` — fixed ``z_i``, DDIM with η > 0 from the inverted ``x_T`` (or from fresh
  noise): images that keep the content CLIP encodes and vary the rest;
* :func:`interpolate` — ``z_θ = slerp(z_a, z_b, θ)``, θ ∈ [0, 1], with ``x_T`` slerped between
  the two inversions, or one random ``x_T`` fixed for every frame (``fix_noise``);
* :func:`text_diff` — ``z_θ = slerp(z_i, z_d, θ)`` with ``z_d = normalise(t_to − t_from)`` the
  direction between two captions' CLIP text embeddings, θ ∈ [0, max_angle], ``x_T`` fixed to the
  inversion of the image.

Latents are decoded without clipping x̂₀ (the inversion does not clip, so the two stay exact
inverses), then put through the upsamplers. Every function returns uint8 ``[N, H, W, 3]`` at the
output resolution; :func:`write_grid` saves a PNG grid. A caption-conditioned decoder gets its
learned null caption throughout; one reading CLIP text features the empty caption's encoding.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax import diffusion, images as images_lib, sharding
from unclip_jax.commands.decoder import save_grid, to_uint8
from unclip_jax.models import decoder as D
from unclip_jax.pipelines import unclip as U

ImageLike = Any   # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray (uint8 [H, W, 3])


# ============================================================================ inputs


def load_pixels(image: ImageLike, size: int) -> np.ndarray:
    """One image → ``[size, size, 3]`` float32 in [-1, 1] (resize + centre crop). A file that
    cannot be decoded raises :class:`unclip_jax.images.ImageLoadError` naming its path."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = images_lib.load_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"an image array must be uint8 [H, W, 1|3|4], got {image.dtype} "
                             f"{image.shape}")
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"cannot use a {type(image).__name__} as an image; accepted: a file "
                         f"path, encoded bytes, a PIL image or a uint8 [H, W, 3] array")
    return images_lib.to_float(images_lib.resize_center_crop(images_lib.to_rgb(image), size))


def slerp(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """Spherical interpolation between ``a`` and ``b`` (same shape ``[…]``, flattened as
    vectors) at fractions ``t`` ``[F]`` → ``[F, …]``. t = 0 gives ``a``, t = 1 gives ``b``;
    for unit vectors every interpolant is unit norm. Nearly parallel vectors fall back to lerp.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
    fa, fb = a.reshape(-1), b.reshape(-1)
    cos = jnp.dot(fa, fb) / jnp.maximum(jnp.linalg.norm(fa) * jnp.linalg.norm(fb), 1e-12)
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(omega)
    small = sin < 1e-6
    wa = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * omega) / jnp.where(small, 1.0, sin))
    wb = jnp.where(small, t, jnp.sin(t * omega) / jnp.where(small, 1.0, sin))
    return (wa[:, None] * fa[None] + wb[:, None] * fb[None]).reshape((t.shape[0],) + a.shape)


# ============================================================================ jitted programs


@functools.lru_cache(maxsize=16)
def _programs(configs: tuple, steps: int, fixed_point_iters: int, up_steps: tuple):
    """Jitted ``embed``, ``invert`` and ``decode`` for one configuration."""
    clip_cfg, _, dcfg, ups = configs
    schedule = diffusion.make_schedule(dcfg.schedule, dcfg.num_timesteps, f"ddim{steps}")
    up_schedules = U.upsampler_schedules(ups, up_steps)
    from unclip_jax.models.clip import CLIP

    def embed(clip_params, x):
        return D.clip_image_embedder(CLIP(clip_cfg), clip_params, dcfg.clip_image_size)(x)

    def invert(params, x, z, guidance):
        cond, uncond = U.decoder_conds(dcfg, params["decoder"], z,
                                       empty_caption=params.get("empty_caption"))
        return diffusion.ddim_invert(
            D.make_denoiser(dcfg), params["decoder"], x, schedule=schedule, cond=cond,
            uncond=uncond, guidance_scale=guidance, model_output=dcfg.model_output,
            fixed_point_iters=fixed_point_iters)

    def decode(params, z, x_T, rng, guidance, eta):
        r_dec, r_up = jax.random.split(rng)
        x = U.decode(dcfg, params["decoder"], z, r_dec, guidance, schedule=schedule,
                     method="ddim", eta=eta, x_T=x_T, clip_x0=None,
                     empty_caption=params.get("empty_caption"))
        x = jnp.clip(x, -1.0, 1.0)
        return U.upsample_chain(ups, params["upsamplers"], x, r_up, schedules=up_schedules)

    return jax.jit(embed), jax.jit(invert), jax.jit(decode)


class Manipulator:
    """The manipulation programs of one :class:`~unclip_jax.pipelines.unclip.UnCLIP`.

    ``steps``: the strided DDIM schedule ("ddim{steps}") of both inversion and decoding;
    ``fixed_point_iters``: refinements per inversion step; ``guidance_scale`` of the decoder
    (None: its config's; used identically by inversion and decoding); ``upsampler_steps``.
    """

    def __init__(self, unclip: U.UnCLIP, *, steps: int = 50, fixed_point_iters: int = 2,
                 guidance_scale: float | None = None,
                 upsampler_steps: Sequence[int] | None = None):
        U.check_chain(*unclip.configs)
        if steps < 1 or steps > unclip.decoder.num_timesteps:
            raise ValueError(f"steps must be in [1, {unclip.decoder.num_timesteps}], got "
                             f"{steps}")
        self.unclip = unclip
        self.size = unclip.decoder.image_size
        self.guidance = jnp.float32(unclip.decoder.guidance_scale if guidance_scale is None
                                    else guidance_scale)
        up = U.Settings(upsampler_steps=None if upsampler_steps is None
                        else tuple(upsampler_steps)).resolved(unclip.configs).upsampler_steps
        self._embed, self._invert, self._decode = _programs(
            unclip.configs, int(steps), int(fixed_point_iters), up)

    def pixels(self, images: Sequence[ImageLike]) -> jax.Array:
        """``[N, S, S, 3]`` float32 in [-1, 1] at the decoder's resolution."""
        return jnp.asarray(np.stack([load_pixels(im, self.size) for im in images]))

    def embed(self, x: jax.Array) -> jax.Array:
        """CLIP image embeddings ``[N, E]`` (unit norm) of pixels ``[N, S, S, 3]``."""
        return self._embed(self.unclip.params["clip"], x)

    def encode(self, images: Sequence[ImageLike]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(pixels [N, S, S, 3], z_i [N, E], x_T [N, S, S, 3])``: the bipartite latents."""
        x = self.pixels(images)
        z = self.embed(x)
        return x, z, self._invert(self.unclip.params, x, z, self.guidance)

    def decode(self, z: jax.Array, x_T: jax.Array, seed: int = 0, eta: float = 0.0) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` from latents (DDIM with ``eta``, then the upsamplers)."""
        if eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        params, z, x_T = self.unclip.params, jnp.asarray(z, jnp.float32), jnp.asarray(x_T,
                                                                                   jnp.float32)
        mesh = U.sampling_mesh(z.shape[0]) if jax.process_count() > 1 else None
        if U.spans_processes(mesh):      # several hosts: the batch split over all of them
            params = U.replicated_params(self.unclip, mesh)
            z, x_T = U.place_batch(z, mesh), U.place_batch(x_T, mesh)
        out = self._decode(params, z, x_T, jax.random.PRNGKey(seed), self.guidance,
                           jnp.float32(eta))
        return to_uint8(sharding.fetch(out))

    def noise(self, n: int, seed: int) -> jax.Array:
        return jax.random.normal(jax.random.PRNGKey(seed), (n, self.size, self.size, 3))


# ============================================================================ manipulations


def _manipulator(unclip, options) -> Manipulator:
    return Manipulator(unclip, **options)


def reconstruct(unclip: U.UnCLIP, image: ImageLike, **options) -> np.ndarray:
    """Invert ``image`` and decode ``(z_i, x_T)`` with η = 0: uint8 ``[1, H, W, 3]``.
    ``options``: those of :class:`Manipulator`."""
    m = _manipulator(unclip, options)
    _, z, x_T = m.encode([image])
    return m.decode(z, x_T, eta=0.0)


def variations(unclip: U.UnCLIP, image: ImageLike, n: int = 8, eta: float = 1.0,
               seed: int = 0, *, from_inversion: bool = True, **options) -> np.ndarray:
    """``n`` variations of ``image``: ``z_i`` fixed, DDIM with ``eta`` > 0 started from the
    image's inverted ``x_T`` (``from_inversion``) or from fresh noise. uint8 ``[n, H, W, 3]``."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    if eta <= 0 and from_inversion:
        raise ValueError(f"variations need eta > 0 (eta = 0 from the inverted x_T "
                         f"reconstructs the image); got eta={eta}")
    m = _manipulator(unclip, options)
    _, z, x_T = m.encode([image])
    start = jnp.repeat(x_T, n, axis=0) if from_inversion else m.noise(n, seed)
    return m.decode(jnp.repeat(z, n, axis=0), start, seed=seed, eta=eta)


def interpolate(unclip: U.UnCLIP, image_a: ImageLike, image_b: ImageLike, frames: int = 8,
                seed: int = 0, fix_noise: bool = False, **options) -> np.ndarray:
    """``frames`` images from ``image_a`` to ``image_b``: ``z_θ = slerp(z_a, z_b, θ)`` for θ
    evenly spaced in [0, 1]; ``x_T`` slerped between the two inversions, or (``fix_noise``) one
    random ``x_T`` from ``seed`` for every frame. DDIM η = 0. uint8 ``[frames, H, W, 3]``."""
    if frames < 2:
        raise ValueError(f"an interpolation needs frames ≥ 2 (both endpoints), got {frames}")
    m = _manipulator(unclip, options)
    _, z, x_T = m.encode([image_a, image_b])
    theta = jnp.linspace(0.0, 1.0, frames)
    zs = slerp(z[0], z[1], theta)
    if fix_noise:
        xs = jnp.repeat(m.noise(1, seed), frames, axis=0)
    else:
        xs = slerp(x_T[0], x_T[1], theta)
    return m.decode(zs, xs, seed=seed, eta=0.0)


def caption_embeddings(unclip: U.UnCLIP, captions: Sequence[str]) -> jax.Array:
    """Unit-norm CLIP text embeddings ``[N, E]`` of captions."""
    captions = U.check_prompts(captions)
    if unclip.tokenizer is None:
        raise ValueError("this UnCLIP has no tokenizer: text diffs need one")
    tokens = unclip.tokenizer.encode(captions, unclip.clip.context_length)
    return _text_embedder(unclip.clip)(unclip.params["clip"], jnp.asarray(tokens))


@functools.lru_cache(maxsize=4)
def _text_embedder(clip_cfg):
    return jax.jit(lambda p, t: U.encode_text(clip_cfg, p, t)[1])


def text_diff(unclip: U.UnCLIP, image: ImageLike, caption_from: str, caption_to: str,
              frames: int = 6, max_angle: float = 0.5, **options) -> np.ndarray:
    """Edit ``image`` toward ``caption_to`` and away from ``caption_from``: ``z_θ = slerp(z_i,
    z_d, θ)`` with ``z_d = normalise(t_to − t_from)``, θ evenly spaced in [0, ``max_angle``]
    (a slerp fraction; the paper uses a maximum of 0.25–0.5), ``x_T`` the image's inversion.
    uint8 ``[frames, H, W, 3]`` (frame 0 is the reconstruction)."""
    if frames < 1:
        raise ValueError(f"frames must be ≥ 1, got {frames}")
    if not 0.0 < max_angle <= 1.0:
        raise ValueError(f"max_angle is a slerp fraction in (0, 1], got {max_angle}")
    t = caption_embeddings(unclip, [caption_from, caption_to])
    diff = t[1] - t[0]
    norm = float(jnp.linalg.norm(diff))
    if norm < 1e-6:
        raise ValueError(f"the captions {caption_from!r} and {caption_to!r} have the same CLIP "
                         f"text embedding, so there is no direction to move along; give two "
                         f"different captions")
    z_d = diff / norm
    m = _manipulator(unclip, options)
    _, z, x_T = m.encode([image])
    zs = slerp(z[0], z_d, jnp.linspace(0.0, max_angle, frames))
    return m.decode(zs, jnp.repeat(x_T, frames, axis=0), eta=0.0)


# ============================================================================ output, scores


def write_grid(images: np.ndarray | Sequence[np.ndarray], path: str | os.PathLike,
               columns: int | None = None) -> Path:
    """Save uint8 images ``[N, H, W, 3]`` (or a list of such rows) as one PNG grid of
    ``columns`` per row (default: all in one row). Returns the path. Several processes: only
    process 0 writes (every process holds the same images)."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"write_grid takes uint8 [N, H, W, 3], got {images.dtype} "
                             f"{images.shape}")
        cols = columns or len(images)
        rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    else:
        rows = [np.asarray(r) for r in images]
    if not rows or not any(len(r) for r in rows):
        raise ValueError("write_grid got no images")
    if jax.process_index() == 0:
        save_grid(rows, path)
    return Path(path)


def _judged_pairs(image: np.ndarray) -> list[tuple[str, str]]:
    from unclip_jax import shapes

    return sorted((o.colour, o.shape) for o in shapes.judge(image).objects)


def variation_consistency(unclip: U.UnCLIP, images: Sequence[ImageLike], n: int = 4,
                          eta: float = 1.0, seed: int = 0, **options) -> float:
    """Fraction of variations whose judged (colour, shape) objects equal the input's (the
    input judged at the decoder's resolution, the variations at the output resolution)."""
    if not len(images):
        raise ValueError("variation_consistency needs at least one image")
    m = _manipulator(unclip, options)
    same = []
    for k, image in enumerate(images):
        x, z, x_T = m.encode([image])
        want = _judged_pairs(to_uint8(x[0]))
        outs = m.decode(jnp.repeat(z, n, axis=0), jnp.repeat(x_T, n, axis=0), seed=seed + k,
                        eta=eta)
        same += [_judged_pairs(o) == want for o in outs]
    return float(np.mean(same))


__all__ = ["Manipulator", "caption_embeddings", "interpolate", "load_pixels", "reconstruct",
           "slerp", "text_diff", "variation_consistency", "variations", "write_grid"]
