"""unCLIP image manipulations on the bipartite latent ``(z_i, x_T)`` (Ramesh et al. 2022, §3).

An image ``x`` (a PNG/JPEG path, encoded bytes, a PIL image of any size and mode, or a uint8
array; see :func:`load_pixels`) is encoded as

* ``z_i`` ``[E]``: its CLIP image embedding, from the image resized and centre-cropped to the
  CLIP's own resolution (Karlo: 224 for OpenAI's ViT-L/14). Unit norm for our decoders; the raw
  projected feature for a decoder that reads raw embeddings (``clip_emb_scale > 0``: Karlo,
  whose ``UnCLIPImageVariationPipeline`` feeds ``CLIPVisionModelWithProjection.image_embeds``);
* ``x_T`` ``[S, S, 3]``: the DDIM inversion of the decoder conditioned on ``z_i``, from the image
  at the decoder's resolution (:func:`unclip_jax.core.diffusion.ddim_invert` on a *strided* "ddimN"
  schedule — the evenly spaced one ends at t ≈ T−1 where ᾱ ≈ 0 and the fixed point barely
  converges — with fixed-point refinement).

Decoding ``(z_i, x_T)`` with DDIM η = 0 on the same schedule reconstructs ``x``
(:func:`reconstruct`). The manipulations:

* :func:`variations` — fixed ``z_i``: DDIM with η > 0 from the inverted ``x_T``, or, with
  ``from_inversion=False``, the decoder's own sampler from fresh noise — its config's method,
  spacing and steps with x̂₀ clipped, exactly the text → image chain's decoder stage on ``z_i``
  (for Karlo: diffusers' ``UnCLIPImageVariationPipeline``);
* :func:`interpolate` — ``z_θ = slerp(z_a, z_b, θ)``, θ ∈ [0, 1], with ``x_T`` slerped between
  the two inversions, or one random ``x_T`` fixed for every frame (``fix_noise``);
* :func:`text_diff` — ``z_θ = slerp(z_i, z_d, θ)`` with ``z_d = normalise(t_to − t_from)`` the
  direction between two captions' unit CLIP text embeddings, θ ∈ [0, max_angle], ``x_T`` fixed
  to the inversion of the image.

Raw embeddings are slerped as directions, their norms interpolated linearly (a text diff keeps
the image embedding's norm); for unit embeddings this is the plain slerp. Inverted latents are
decoded without clipping x̂₀ (the inversion does not clip, so the two stay exact inverses), then
every output goes through the upsampler stages (Karlo: ``super_res_first`` with
``super_res_last`` on the final step). Every function returns uint8 ``[N, H, W, 3]`` at the
output resolution; :func:`write_grid` (that is :func:`unclip_jax.core.images.save_grid`) saves a
PNG grid. A caption-conditioned decoder gets its learned null caption throughout; one reading
CLIP text features (Karlo) the empty caption's encoding in both guidance branches.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax.core import diffusion, images as images_lib, sharding
from unclip_jax.core.images import save_grid, to_uint8
from unclip_jax.models import decoder as D
from unclip_jax.models.clip import FrozenCLIP
from unclip_jax.pipelines import unclip as U

ImageLike = Any   # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray (uint8)

MIN_IMAGE_SIDE = 8    # px on the shorter side; smaller inputs are refused, not blown up


# ============================================================================ inputs


def _as_image(image: ImageLike) -> Image.Image:
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        return images_lib.load_image(image)      # refuses oversized files from the header
    if isinstance(image, np.ndarray):
        ok = image.dtype == np.uint8 and (image.ndim == 2 or (
            image.ndim == 3 and image.shape[-1] in (1, 3, 4)))
        if not ok:
            raise ValueError(f"an image array must be uint8 [H, W] (grey) or [H, W, 1|3|4] "
                             f"(grey, RGB, RGBA), got {image.dtype} {image.shape}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        return Image.fromarray(image)
    if isinstance(image, Image.Image):
        return image
    raise ValueError(f"cannot use a {type(image).__name__} as an image; accepted: a file "
                     f"path, encoded bytes, a PIL image or a uint8 [H, W(, C)] array")


def load_pixels(image: ImageLike, size: int) -> np.ndarray:
    """One image → ``[size, size, 3]`` float32 in [-1, 1] (resize so the shorter side is
    ``size``, centre crop). Any mode is converted to RGB (grey replicated, RGBA / LA / P with
    transparency composited on white, CMYK converted; see :mod:`unclip_jax.core.images`). Refused
    with a ValueError: an image whose shorter side is under ``MIN_IMAGE_SIDE`` px, or one over
    PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``; a file that large is
    refused from its header, :class:`unclip_jax.core.images.ImageLoadError`). A file that cannot be
    decoded raises ImageLoadError naming its path."""
    img = _as_image(image)
    w, h = img.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ValueError(f"the image is {w}×{h} pixels; manipulations need at least "
                         f"{MIN_IMAGE_SIDE} px on the shorter side (it is resized to "
                         f"{size}×{size}); give a larger image")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ValueError(f"the image is {w}×{h} = {w * h} pixels, over the limit of {limit} "
                         f"(PIL.Image.MAX_IMAGE_PIXELS, the decompression-bomb guard); "
                         f"downscale it first")
    return images_lib.to_float(images_lib.resize_center_crop(images_lib.to_rgb(img), size))


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


def slerp_embeddings(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """Embeddings ``[F, E]`` between ``a`` and ``b`` ``[E]``: the slerp of their directions,
    scaled by their norms interpolated linearly (for unit vectors: :func:`slerp`)."""
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
    return slerp(a / na, b / nb, t) * ((1.0 - t) * na + t * nb)[:, None]


# ============================================================================ checks


def check_image_tower(unclip: U.UnCLIP) -> None:
    """ValueError unless the chain has what manipulations need besides the text → image
    chain: a CLIP image tower (a converted Karlo stack has none of its own; the embedding
    widths are :func:`~unclip_jax.pipelines.unclip.check_chain`'s), and the empty caption's
    encoding where the decoder reads CLIP text features."""
    if "visual" not in unclip.params.get("clip", {}):
        raise ValueError(f"the CLIP of this chain has no image tower (params['clip'] has no "
                         f"'visual'), and image manipulations embed images with it: convert "
                         f"the full CLIP the decoder was trained on (Karlo: {U.KARLO_CLIP})")
    if U.needs_empty_caption(unclip.configs) and "empty_caption" not in unclip.params:
        raise ValueError("this decoder reads CLIP text features and manipulations condition "
                         "it on the empty caption: params['empty_caption'] is missing; build "
                         "the model with load_unclip or with_empty_caption")


def image_embedding(clip_cfg, clip_params, pixels: jax.Array, raw: bool) -> jax.Array:
    """CLIP image embeddings ``[N, E]`` of ``[N, s, s, 3]`` pixels in [-1, 1] at the CLIP's
    resolution: the raw projected feature (``raw``) or unit norm."""
    return FrozenCLIP(clip_cfg, clip_params).embed_images(pixels, normalize=not raw)


# ============================================================================ jitted programs


@functools.lru_cache(maxsize=16)
def _programs(configs: tuple, steps: int, fixed_point_iters: int, up_steps: tuple,
              decoder_steps: int):
    """Jitted ``embed``, ``invert``, ``decode`` (DDIM from given latents) and ``sample`` (the
    decoder's own sampler from fresh noise) for one configuration."""
    clip_cfg, _, dcfg, ups = configs
    schedule = diffusion.make_schedule(dcfg.schedule, dcfg.num_timesteps, f"ddim{steps}")
    own_schedule = U.decoder_schedule(dcfg, decoder_steps)
    up_schedules = U.upsampler_schedules(ups, up_steps)
    raw = dcfg.clip_emb_scale > 0

    def embed(clip_params, x):
        return image_embedding(clip_cfg, clip_params, x, raw)

    def invert(params, x, z, guidance):
        cond, uncond = U.decoder_conds(dcfg, params["decoder"], z,
                                       empty_caption=params.get("empty_caption"))
        return diffusion.ddim_invert(
            D.make_denoiser(dcfg), params["decoder"], x, schedule=schedule, cond=cond,
            uncond=uncond, guidance_scale=guidance, model_output=dcfg.model_output,
            fixed_point_iters=fixed_point_iters, guidance_interval=D.guidance_interval(dcfg),
            self_condition=dcfg.self_condition > 0)

    def decode(params, z, x_T, rng, guidance, eta):
        r_dec, r_up = jax.random.split(rng)
        x = U.decode(dcfg, params["decoder"], z, r_dec, guidance, schedule=schedule,
                     method="ddim", eta=eta, x_T=x_T, clip_x0=None,
                     empty_caption=params.get("empty_caption"))
        x = jnp.clip(x, -1.0, 1.0)
        return U.upsample_chain(ups, params["upsamplers"], x, r_up, schedules=up_schedules)

    def sample(params, z, rng, guidance, eta):
        r_dec, r_up = jax.random.split(rng)
        x = U.decode(dcfg, params["decoder"], z, r_dec, guidance, schedule=own_schedule,
                     method=dcfg.sample_method, eta=eta,
                     empty_caption=params.get("empty_caption"))
        x = jnp.clip(x, -1.0, 1.0)
        return U.upsample_chain(ups, params["upsamplers"], x, r_up, schedules=up_schedules)

    return jax.jit(embed), jax.jit(invert), jax.jit(decode), jax.jit(sample)


class Manipulator:
    """The manipulation programs of one :class:`~unclip_jax.pipelines.unclip.UnCLIP`.

    ``steps``: the strided DDIM schedule ("ddim{steps}") of both inversion and decoding;
    ``fixed_point_iters``: refinements per inversion step; ``guidance_scale`` of the decoder
    (None: its config's; used identically by inversion and decoding); ``upsampler_steps`` (per
    upsampler stage; None: their configs'); ``decoder_steps``: the decoder's own sampler's
    steps for variations from fresh noise (None: its config's ``sample_steps``).
    """

    def __init__(self, unclip: U.UnCLIP, *, steps: int = 50, fixed_point_iters: int = 2,
                 guidance_scale: float | None = None,
                 upsampler_steps: Sequence[int] | None = None,
                 decoder_steps: int | None = None):
        U.check_chain(*unclip.configs)
        check_image_tower(unclip)
        t = unclip.decoder.num_timesteps
        if steps < 1 or steps > t:
            raise ValueError(f"steps must be in [1, {t}], got {steps}")
        decoder_steps = int(unclip.decoder.sample_steps if decoder_steps is None
                            else decoder_steps)
        if decoder_steps < 1 or decoder_steps > t:
            raise ValueError(f"decoder_steps must be in [1, {t}], got {decoder_steps}")
        self.unclip = unclip
        self.size = unclip.decoder.image_size
        self.clip_size = unclip.clip.image_size
        self.guidance = jnp.float32(unclip.decoder.guidance_scale if guidance_scale is None
                                    else guidance_scale)
        up = U.Settings(upsampler_steps=None if upsampler_steps is None
                        else tuple(upsampler_steps)).resolved(unclip.configs).upsampler_steps
        self._embed, self._invert, self._decode, self._sample = _programs(
            unclip.configs, int(steps), int(fixed_point_iters), up, decoder_steps)

    def pixels(self, images: Sequence[ImageLike], size: int | None = None) -> jax.Array:
        """``[N, s, s, 3]`` float32 in [-1, 1] at ``size`` (default: the decoder's)."""
        return jnp.asarray(np.stack([load_pixels(im, size or self.size) for im in images]))

    def embed(self, x: jax.Array) -> jax.Array:
        """CLIP image embeddings ``[N, E]`` of pixels ``[N, c, c, 3]`` at the CLIP's resolution
        (raw for a decoder with ``clip_emb_scale > 0``, else unit norm)."""
        if x.shape[1:3] != (self.clip_size, self.clip_size):
            raise ValueError(f"the CLIP takes {self.clip_size}×{self.clip_size} pixels, got "
                             f"{tuple(x.shape)}; use pixels(images, size=clip_size)")
        return self._embed(self.unclip.params["clip"], x)

    def encode(self, images: Sequence[ImageLike]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(pixels [N, S, S, 3], z_i [N, E], x_T [N, S, S, 3])``: the bipartite latents
        (``z_i`` from the images at the CLIP's resolution, ``x_T`` from them at the
        decoder's)."""
        x = self.pixels(images)
        z = self.embed(self.pixels(images, self.clip_size))
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

    def sample(self, z: jax.Array, seed: int = 0, eta: float = 0.0) -> jax.Array:
        """Images ``[N, H, W, 3]`` in [-1, 1] from embeddings ``[N, E]`` with the decoder's own
        sampler from fresh noise (the text → image chain's decoder and upsampler stages)."""
        if eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        return self._sample(self.unclip.params, jnp.asarray(z, jnp.float32),
                            jax.random.PRNGKey(seed), self.guidance, jnp.float32(eta))

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
    """``n`` variations of ``image`` with ``z_i`` fixed: DDIM with ``eta`` > 0 started from
    the image's inverted ``x_T`` (``from_inversion``, the paper's), or the decoder's own sampler
    (its config's method, spacing and ``decoder_steps``; ``eta`` where that is DDIM) from
    fresh noise — for Karlo, diffusers' ``UnCLIPImageVariationPipeline``. uint8
    ``[n, H, W, 3]``. ``options``: those of :class:`Manipulator`."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    if eta <= 0 and from_inversion:
        raise ValueError(f"variations need eta > 0 (eta = 0 from the inverted x_T "
                         f"reconstructs the image); got eta={eta}")
    m = _manipulator(unclip, options)
    if not from_inversion:
        z = m.embed(m.pixels([image], m.clip_size))
        return to_uint8(m.sample(jnp.repeat(z, n, axis=0), seed=seed, eta=eta))
    _, z, x_T = m.encode([image])
    return m.decode(jnp.repeat(z, n, axis=0), jnp.repeat(x_T, n, axis=0), seed=seed, eta=eta)


def interpolate(unclip: U.UnCLIP, image_a: ImageLike, image_b: ImageLike, frames: int = 8,
                seed: int = 0, fix_noise: bool = False, **options) -> np.ndarray:
    """``frames`` images from ``image_a`` to ``image_b``: ``z_θ`` = :func:`slerp_embeddings`
    of ``z_a``, ``z_b`` for θ evenly spaced in [0, 1]; ``x_T`` slerped between the two
    inversions, or (``fix_noise``) one random ``x_T`` from ``seed`` for every frame. DDIM
    η = 0. uint8 ``[frames, H, W, 3]``."""
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 2:
        raise ValueError(f"an interpolation needs frames ≥ 2 (both endpoints), got {frames!r}")
    m = _manipulator(unclip, options)
    _, z, x_T = m.encode([image_a, image_b])
    theta = jnp.linspace(0.0, 1.0, frames)
    zs = slerp_embeddings(z[0], z[1], theta)
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
    z_d, θ)`` with ``z_d = normalise(t_to − t_from)`` (unit text embeddings), θ evenly spaced
    in [0, ``max_angle``] (a slerp fraction; the paper uses a maximum of 0.25–0.5), ``x_T`` the
    image's inversion; a raw image embedding is slerped as a direction and keeps its norm.
    uint8 ``[frames, H, W, 3]`` (frame 0 is the reconstruction). ValueError for two captions
    that are the same (up to case and spacing) or share one CLIP embedding."""
    if frames < 1:
        raise ValueError(f"frames must be ≥ 1, got {frames}")
    if not 0.0 < max_angle <= 1.0:
        raise ValueError(f"max_angle is a slerp fraction in (0, 1], got {max_angle}")
    if isinstance(caption_from, str) and isinstance(caption_to, str) and (
            " ".join(caption_from.split()).lower() == " ".join(caption_to.split()).lower()):
        raise ValueError(f"the two captions are the same ({caption_from!r}): a text diff "
                         f"moves the image along the difference of two captions' CLIP "
                         f"embeddings; give a --from and a --to that differ")
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
    n_i = jnp.linalg.norm(z[0])        # 1 for unit embeddings; kept for raw ones (Karlo)
    zs = slerp(z[0] / n_i, z_d, jnp.linspace(0.0, max_angle, frames)) * n_i
    return m.decode(zs, jnp.repeat(x_T, frames, axis=0), eta=0.0)


# ============================================================================ output, scores


# The pipelines' name for the one grid writer (kept for callers of this module).
write_grid = save_grid


def _judged_pairs(image: np.ndarray) -> list[tuple[str, str]]:
    from unclip_jax.core import shapes

    return sorted((o.colour, o.shape) for o in shapes.judge(image).objects)


def variation_consistency(unclip: U.UnCLIP, images: Sequence[ImageLike], n: int = 4,
                          eta: float = 1.0, seed: int = 0, *, from_inversion: bool = True,
                          **options) -> float:
    """Fraction of the ``n`` :func:`variations` of each image (seed ``seed + k`` for the k-th)
    whose judged (colour, shape) objects equal the input's (the input judged at the decoder's
    resolution, the variations at the output resolution)."""
    if not len(images):
        raise ValueError("variation_consistency needs at least one image")
    m = _manipulator(unclip, options)
    same = []
    for k, image in enumerate(images):
        want = _judged_pairs(to_uint8(m.pixels([image])[0]))
        outs = variations(unclip, image, n=n, eta=eta, seed=seed + k,
                          from_inversion=from_inversion, **options)
        same += [_judged_pairs(o) == want for o in outs]
    return float(np.mean(same))


__all__ = ["MIN_IMAGE_SIDE", "Manipulator", "caption_embeddings", "check_image_tower",
           "image_embedding", "interpolate", "load_pixels", "reconstruct", "slerp",
           "slerp_embeddings", "text_diff", "variation_consistency", "variations",
           "write_grid"]
