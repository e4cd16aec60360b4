"""unCLIP text → image (Ramesh et al. 2022) as one pure function under one ``jax.jit``.

The chain: caption tokens ``[B, L]`` → CLIP text tower (token states ``[B, L, W]`` and
unit-norm text embedding ``[B, E]``) → diffusion prior (the shared sampler, classifier-free
guidance, ``k`` candidates per caption, the one with the highest dot product with the text
embedding kept) → decoder (the shared sampler, guided against its learned nulls) →
upsampler(s) (the shared sampler, few-step DDIM, no guidance) → images ``[B, H, W, 3]`` in
[-1, 1]. Each stage samples with its config's method and timestep spacing (``sample_method``,
``sample_spacing``) unless :class:`Settings` overrides them. Every stage is a pure function of
its params; :func:`make_text_to_image` composes them into ``fn(params, tokens, rng,
guidance)``. Static (one compile per value and input shape): step counts, methods, η,
``num_candidates``. Traced: ``guidance = (prior_scale, decoder_scale)``, so new guidance scales
never recompile.

From a notebook, three calls::

    from unclip_jax.pipelines import unclip
    model = unclip.load_unclip("runs/demo/clip", "runs/demo/tokenizer.model",
                               "runs/demo/prior", "runs/demo/decoder", ["runs/demo/upsampler"])
    images = unclip.generate(model, ["a big red circle above a small blue square"], seed=0)
    # images: uint8 [1, H, W, 3]

For full control: ``fn = unclip.make_text_to_image(model, unclip.Settings(decoder_steps=25))``
then ``fn(model.params, tokens, jax.random.PRNGKey(0), (prior_scale, decoder_scale))``.
Only the diffusion prior runs inside the jitted chain (the AR prior has its own token loop).

Converted Karlo stacks (:mod:`unclip_jax.pipelines.convert.karlo`, with an OpenAI ViT-L/14 CLIP from
``unclip-jax convert clip`` and its BPE vocabulary) run through the same chain; their configs
say what differs from ours, and the chain follows them:

* ``PriorConfig.uncond = "empty_caption"``: Karlo has no learned null text; the guidance's
  unconditional input is the CLIP encoding of the empty caption (``params["empty_caption"]``,
  computed once by :func:`load_unclip` / :func:`with_empty_caption`). The same encoding is the
  decoder's unconditional CLIP text (``DecoderConfig.clip_text_width > 0``), next to its learned
  null image embedding, exactly as diffusers' ``UnCLIPPipeline`` builds its guidance batch.
* ``PriorConfig.unit_text_emb = False``: the prior (and the decoder's CLIP text input) read the
  raw projected EOS feature, not the unit-norm embedding.
* ``sample_spacing = "unclip"``, ``sample_method = "ddpm"``: ``UnCLIPScheduler``'s timesteps.
* ``UpsamplerConfig.last_step``: an upsampler that takes only the final sampling step of the
  stage before it (Karlo's ``super_res_last`` after ``super_res_first``); a stage is one
  upsampler, or one plus its last-step network.
* ``UpsamplerConfig.low_res_resize = "cubic"``: the low-res image enlarged bicubically
  (antialiased, as ``torch.nn.functional.interpolate(..., "bicubic", antialias=True)``).

Text masks are "up to and including the first EOS" (Hugging Face's ``attention_mask``), so a
real token that shares the padding id (CLIP BPE's ``!`` is id 0) is not masked out.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core import sharding

from unclip_jax.train import runs
from unclip_jax.core.images import to_uint8
from unclip_jax.models import decoder as D
from unclip_jax.models import prior as P
from unclip_jax.models.clip import CLIPConfig, FrozenCLIP, eos_positions
from unclip_jax.models.sampling import (  # noqa: F401  (the stages, re-exported here)
    SPACINGS, check_choice, decode, decoder_conds, decoder_schedule, prior_embeddings,
    prior_schedule, stage_denoiser, stage_schedule, upsample_chain, upsample_stage,
    upsampler_schedules, upsampler_stages)

UNCONDS = ("learned", "empty_caption")  # PriorConfig.uncond values
RESIZES = ("linear", "cubic")           # UpsamplerConfig.low_res_resize values

# ============================================================================ the models


@dataclasses.dataclass(frozen=True, eq=False)
class UnCLIP:
    """The frozen models of the chain: configs (static) and ``params`` (arguments).

    ``params = {"clip": …, "prior": …, "decoder": …, "upsamplers": (…, …)}``, plus
    ``"empty_caption"`` (see :func:`with_empty_caption`) where a config asks for it;
    ``tokenizer`` is a :class:`unclip_jax.core.text.Tokenizer` or :class:`ClipBPE` (None: only the
    token-level API works).
    """

    clip: CLIPConfig
    prior: P.PriorConfig
    decoder: D.DecoderConfig
    upsamplers: tuple[D.UpsamplerConfig, ...]
    params: dict
    tokenizer: Any = None

    @property
    def configs(self) -> tuple:
        """The hashable static part (a cache key for compiled functions)."""
        return (self.clip, self.prior, self.decoder, tuple(self.upsamplers))

    @property
    def resolution(self) -> int:
        """Side of the output images (the last upsampler's, else the decoder's)."""
        return self.upsamplers[-1].image_size if self.upsamplers else self.decoder.image_size


def check_chain(clip: CLIPConfig, prior: P.PriorConfig, decoder: D.DecoderConfig,
                upsamplers: Sequence[D.UpsamplerConfig]) -> None:
    """Raise ValueError unless the models' sizes and sampling options fit together."""
    check_choice("prior uncond", prior.uncond, UNCONDS)
    check_choice("prior sample_spacing", prior.sample_spacing, SPACINGS)
    check_choice("decoder sample_spacing", decoder.sample_spacing, SPACINGS)
    for i, up in enumerate(upsamplers):
        check_choice(f"upsampler {i} sample_spacing", up.sample_spacing, SPACINGS)
        check_choice(f"upsampler {i} low_res_resize", up.low_res_resize, RESIZES)
    if decoder.clip_text_width and decoder.clip_text_width != clip.text_width:
        raise ValueError(f"the decoder reads CLIP token states of width "
                         f"{decoder.clip_text_width}, the CLIP's text tower has width "
                         f"{clip.text_width}")
    if not clip.embed_dim == prior.embed_dim == decoder.clip_dim:
        karlo = (f" (a converted Karlo decoder needs {KARLO_CLIP})"
                 if decoder.clip_emb_scale > 0 else "")
        raise ValueError(f"embedding sizes disagree: CLIP embed_dim {clip.embed_dim}, prior "
                         f"embed_dim {prior.embed_dim}, decoder clip_dim {decoder.clip_dim}; "
                         f"the prior and decoder must be trained on this CLIP{karlo}")
    if prior.text_width != clip.text_width:
        raise ValueError(f"the prior reads CLIP text states of width {prior.text_width}, the "
                         f"CLIP's text tower has width {clip.text_width}")
    if clip.context_length > prior.context_length:
        raise ValueError(f"the CLIP's {clip.context_length} text tokens exceed the prior's "
                         f"context_length {prior.context_length}")
    size = decoder.image_size
    for stage in upsampler_stages(upsamplers):
        i, up = stage[0], upsamplers[stage[0]]
        if up.low_res_size != size:
            raise ValueError(f"upsampler {i} takes {up.low_res_size}×{up.low_res_size} inputs "
                             f"but the stage before it makes {size}×{size} images; accepted: "
                             f"an upsampler whose low_res_size is {size}")
        size = up.image_size


def load_unclip(clip_workdir: str | os.PathLike, tokenizer_path: str | os.PathLike | None,
                prior_workdir: str | os.PathLike, decoder_workdir: str | os.PathLike,
                upsampler_workdirs: Sequence[str | os.PathLike] = (), *,
                ema: bool | None = None) -> UnCLIP:
    """The latest checkpoints of the four kinds of training run, checked to fit together.

    ``tokenizer_path``: a sentencepiece model (ours), or CLIP's BPE vocabulary
    (``bpe_simple_vocab_16e6.txt.gz``, for a CLIP imported by ``unclip-jax convert clip``);
    None: the CLIP run's own (``data.tokenizer`` or beside its workdir).
    ``ema``: None = EMA params where a run kept them (the decoder and upsamplers; the CLIP and
    prior loaders always take the EMA params when kept). Upsampler workdirs are given in order;
    one with ``last_step`` joins the stage before it (Karlo: ``super_res_first``,
    ``super_res_last``).
    """
    if isinstance(upsampler_workdirs, (str, os.PathLike)):
        upsampler_workdirs = [upsampler_workdirs]
    try:
        clip = runs.load_clip(clip_workdir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no CLIP at {str(clip_workdir)!r} ({e}). "
                                f"{clip_hint(decoder_workdir)}") from None
    if tokenizer_path is None:
        try:
            tokenizer_path = runs.tokenizer_path(clip_workdir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (for a CLIP imported from OpenAI/open_clip: its BPE "
                                    f"vocabulary bpe_simple_vocab_16e6.txt.gz, --bpe-vocab "
                                    f"on the command line)") from None
    tok = load_tokenizer(tokenizer_path)
    check_tokenizer(tok, clip.config)
    prior = runs.load_prior(prior_workdir)
    dec_params, dec_cfg = runs.load_decoder(decoder_workdir, ema)
    ups = [runs.load_upsampler(w, ema) for w in upsampler_workdirs]
    check_chain(clip.config, prior.cfg, dec_cfg, [c for _, c in ups])
    params = {"clip": clip.params, "prior": prior.params, "decoder": dec_params,
              "upsamplers": tuple(p for p, _ in ups)}
    model = UnCLIP(clip.config, prior.cfg, dec_cfg, tuple(c for _, c in ups),
                   jax.tree.map(jnp.asarray, params), tok)
    return with_empty_caption(model) if needs_empty_caption(model.configs) else model


KARLO_CLIP = ("OpenAI's CLIP ViT-L/14 (768-d): convert open_clip's ViT-L-14 'openai' "
              "weights with `unclip-jax convert clip open_clip_model.safetensors --out "
              "runs/vitl14`, then pass --clip runs/vitl14 --bpe-vocab "
              "bpe_simple_vocab_16e6.txt.gz")


def clip_hint(decoder_workdir: str | os.PathLike) -> str:
    """What CLIP a decoder needs, for error messages (Karlo's: which weights to convert)."""
    try:
        model = runs.read_run_config(decoder_workdir).get("model", {})
    except (FileNotFoundError, ValueError):
        return "The chain needs the CLIP the decoder was trained on."
    dim = model.get("clip_dim", "?")
    if model.get("clip_emb_scale", 0) > 0 or model.get("clip_text_width", 0) > 0:
        return (f"The decoder (a converted Karlo decoder) is conditioned on {dim}-d embeddings "
                f"of {KARLO_CLIP}.")
    return (f"The decoder is conditioned on {dim}-d embeddings of the CLIP it was trained on "
            f"(its model.clip_workdir: {model.get('clip_workdir') or 'not recorded'}).")


class ClipBPE:
    """CLIP's byte-level BPE (:class:`unclip_jax.pipelines.convert.clip_bpe.ClipBPETokenizer`)
    behind the
    interface the pipelines use — that of :class:`unclip_jax.core.text.Tokenizer`:
    ``encode(texts, context_length)``, ``pad_id``, ``eos_id``, ``vocab_size``."""

    pad_id = 0

    def __init__(self, vocab_path: str | os.PathLike):
        from unclip_jax.pipelines.convert.clip_bpe import ClipBPETokenizer

        self.bpe = ClipBPETokenizer(vocab_path)
        self.path = str(vocab_path)
        self.eos_id, self.bos_id = self.bpe.eot_id, self.bpe.sot_id

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    def encode(self, texts: str | Sequence[str], context_length: int) -> np.ndarray:
        """``[N, context_length]`` int32: SOT, ids, EOT, zeros (open_clip's rows)."""
        return self.bpe([texts] if isinstance(texts, str) else list(texts), context_length)


BPE_SUFFIXES = (".txt", ".txt.gz")


def load_tokenizer(path: str | os.PathLike):
    """A sentencepiece :class:`~unclip_jax.core.text.Tokenizer` (``.model``), or :class:`ClipBPE`
    for
    CLIP's BPE vocabulary (a merges file, ``.txt`` or ``.txt.gz``)."""
    from unclip_jax.core.text import Tokenizer

    if str(path).endswith(BPE_SUFFIXES):
        return ClipBPE(path)
    return Tokenizer.load(path)


def check_tokenizer(tok, clip: CLIPConfig) -> None:
    """ValueError unless the tokenizer's ids fit the CLIP's embedding table and EOS id."""
    n, eos = tok.vocab_size, getattr(tok, "eos_id", clip.eos_id)
    path = getattr(tok, "path", None) or "the tokenizer"
    if n > clip.vocab_size or eos != clip.eos_id:
        raise ValueError(f"{path} (vocabulary {n}, EOS id {eos}) does not fit the CLIP "
                         f"(vocab_size {clip.vocab_size}, eos_id {clip.eos_id}); pass the "
                         f"tokenizer the CLIP was trained with (OpenAI/open_clip CLIPs: "
                         f"bpe_simple_vocab_16e6.txt.gz)")


def needs_empty_caption(configs: tuple) -> bool:
    """Whether the chain guides with the empty caption's CLIP encoding (Karlo's prior or a
    decoder reading CLIP text features)."""
    _, prior, decoder, _ = configs
    return prior.uncond == "empty_caption" or decoder.clip_text_width > 0


def with_empty_caption(unclip: UnCLIP) -> UnCLIP:
    """``unclip`` with ``params["empty_caption"] = {"emb": [E] raw, "states": [L, W],
    "valid": [L]}``: the CLIP encoding of the caption "" (SOT, EOT, padding), Karlo's
    unconditional input. Needs the tokenizer."""
    if unclip.tokenizer is None:
        raise ValueError("with_empty_caption needs the UnCLIP's tokenizer (to encode \"\")")
    empty = D.empty_caption_features(FrozenCLIP(unclip.clip, unclip.params["clip"]),
                                     unclip.tokenizer, unclip.clip.context_length)
    return dataclasses.replace(unclip, params={**unclip.params, "empty_caption": empty})


# ============================================================================ settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static sampling settings (None = the model config's default)."""

    prior_steps: int | None = None          # respaced prior steps (paper: 64)
    prior_method: str | None = None         # "ddim" | "ddpm" | "dpmpp_2m"
    prior_eta: float | None = None
    num_candidates: int | None = None       # k draws per caption, best by dot product kept
    decoder_steps: int | None = None
    decoder_method: str | None = None
    decoder_eta: float = 0.0
    upsampler_steps: tuple[int, ...] | None = None   # per upsampler stage (paper: 27, 15)
    upsampler_method: str | None = None              # None: each stage's config's
    upsampler_eta: float = 0.0

    def resolved(self, unclip_configs: tuple) -> "Settings":
        _, prior, decoder, ups = unclip_configs
        pick = lambda v, d: d if v is None else v  # noqa: E731
        stages = upsampler_stages(ups)
        up_steps = pick(self.upsampler_steps, tuple(ups[s[0]].sample_steps for s in stages))
        if isinstance(up_steps, int):
            up_steps = (up_steps,) * len(stages)
        if len(up_steps) != len(stages):
            raise ValueError(f"upsampler_steps has {len(up_steps)} entries for {len(stages)} "
                             f"upsampler stages")
        out = dataclasses.replace(
            self, prior_steps=int(pick(self.prior_steps, prior.sample_steps)),
            prior_method=pick(self.prior_method, prior.sample_method),
            prior_eta=float(pick(self.prior_eta, prior.eta)),
            num_candidates=int(pick(self.num_candidates, prior.num_candidates)),
            decoder_steps=int(pick(self.decoder_steps, decoder.sample_steps)),
            decoder_method=pick(self.decoder_method, decoder.sample_method),
            upsampler_steps=tuple(int(s) for s in up_steps))
        if out.num_candidates < 1:
            raise ValueError(f"num_candidates must be ≥ 1, got {out.num_candidates}")
        for name in ("prior_steps", "decoder_steps"):
            if getattr(out, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(out, name)}")
        return out


def settings_from(**kwargs) -> Settings:
    """:class:`Settings` from keyword arguments; an unknown name is an error naming the valid."""
    names = [f.name for f in dataclasses.fields(Settings)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {', '.join(unknown)}; accepted: "
                         f"{', '.join(names)}, prior_guidance, decoder_guidance")
    if isinstance(kwargs.get("upsampler_steps"), list):
        kwargs["upsampler_steps"] = tuple(kwargs["upsampler_steps"])
    return Settings(**kwargs)


# ============================================================================ the stages


def encode_text(clip_cfg: CLIPConfig, clip_params, tokens: jax.Array, *,
                normalize: bool = True):
    """CLIP text tower (:class:`~unclip_jax.models.clip.FrozenCLIP`): ``[B, L]`` int32 →
    (states ``[B, L, W]``, embedding ``[B, E]``), the embedding unit-norm, or with
    ``normalize=False`` the raw projected EOS feature (Karlo's ``text_embeds``)."""
    text = FrozenCLIP(clip_cfg, clip_params).encode_text(tokens)
    return text["states"], text["emb"] if normalize else text["raw"]


def unit(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm."""
    x = jnp.asarray(x, jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def text_mask(clip_cfg: CLIPConfig, tokens: jax.Array) -> jax.Array:
    """``[B, L]`` bool: positions up to and including each row's first EOS (Hugging Face's
    ``attention_mask``); rows without one: up to the last non-pad token."""
    last = eos_positions(tokens, clip_cfg.eos_id, clip_cfg.pad_id)
    return jnp.arange(tokens.shape[1])[None] <= last[:, None]


# ============================================================================ the chain


def sampling_mesh(batch: int) -> jax.sharding.Mesh | None:
    """A one-axis ``("data",)`` mesh to split a sampling batch of ``batch`` over (each device
    draws ``batch / n`` of the samples), or None when there is one device or the batch does
    not split evenly. Several processes (a pod slice): every process's devices when the batch
    splits over all of them (every process must then make the same call, with the same
    prompts: the samples are computed once, split over the hosts, and gathered), else this
    process's own. On a CPU split into one device per core
    (:func:`unclip_jax.core.sharding.split_cpu_cores`) this keeps every core busy while sampling."""
    if jax.process_count() > 1 and batch % jax.device_count() == 0:
        return jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    devices = jax.local_devices()
    if len(devices) < 2 or batch % len(devices):
        return None
    return jax.sharding.Mesh(np.array(devices), ("data",))


def spans_processes(mesh: jax.sharding.Mesh | None) -> bool:
    """Whether ``mesh`` holds other processes' devices (its arrays are placed with
    :func:`unclip_jax.core.sharding.from_host` and read with
    :func:`unclip_jax.core.sharding.fetch`)."""
    return sharding.spans_processes(mesh)


def place_batch(x, mesh: jax.sharding.Mesh):
    """Host (or this process's) array ``x`` split over ``mesh``'s ``data`` axis (every process
    passes the same ``x`` when the mesh spans processes)."""
    return sharding.put_rows(sharding.fetch(x) if spans_processes(mesh) else x, mesh)


def batch_shardings(mesh: jax.sharding.Mesh | None):
    """``ndim -> NamedSharding`` splitting axis 0 over ``mesh`` (None without a mesh)."""
    if mesh is None:
        return None
    P = jax.sharding.PartitionSpec
    return lambda ndim: jax.sharding.NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


_REPLICATED: dict = {}


def replicated_params(unclip: UnCLIP, mesh: jax.sharding.Mesh):
    """``unclip.params`` copied onto every device of ``mesh`` (once per model and mesh; from
    each host's own copy when the mesh spans processes)."""
    key = (id(unclip.params), mesh)
    if key not in _REPLICATED:
        _REPLICATED.clear()             # one model's copies at a time
        _REPLICATED[key] = (unclip.params, sharding.put_replicated(unclip.params, mesh))
    return _REPLICATED[key][1]


def make_text_to_image(unclip: UnCLIP, settings: Settings | None = None,
                       mesh: jax.sharding.Mesh | None = None):
    """The jitted pure chain ``fn(params, tokens [B, L] int32, rng, guidance) -> images
    [B, H, W, 3]`` float32 in [-1, 1] (H = :attr:`UnCLIP.resolution`).

    ``guidance = (prior_scale, decoder_scale)``, traced. The same configs and settings give the
    same jitted object (``fn._cache_size()`` counts its compiles, one per input shape).
    ``mesh`` (:func:`sampling_mesh`): every stage's samples split over its ``data`` axis
    (pass tokens sharded the same way and params replicated); the images are those of the
    unsplit chain.
    """
    return _text_to_image(unclip.configs, (settings or Settings()).resolved(unclip.configs),
                          mesh)


@functools.lru_cache(maxsize=16)
def _text_to_image(configs: tuple, s: Settings, mesh=None):
    clip_cfg, prior_cfg, dec_cfg, ups = configs
    check_chain(clip_cfg, prior_cfg, dec_cfg, ups)
    p_schedule = prior_schedule(prior_cfg, s.prior_steps)
    dec_schedule = decoder_schedule(dec_cfg, s.decoder_steps)
    up_schedules = upsampler_schedules(ups, s.upsampler_steps)

    empty = needs_empty_caption(configs)
    split = batch_shardings(mesh)

    def text_to_image(params, tokens, rng, guidance):
        prior_scale, decoder_scale = guidance
        tokens = jnp.asarray(tokens, jnp.int32)
        r_prior, r_dec, r_up = jax.random.split(rng, 3)
        p_uncond = clip_text = uncond_clip_text = None
        if not empty:
            states, text_emb = encode_text(clip_cfg, params["clip"], tokens)
            mask = None
        else:
            if "empty_caption" not in params:
                raise ValueError("this chain guides with the empty caption's CLIP encoding "
                                 "(Karlo): params['empty_caption'] is missing; build the model "
                                 "with load_unclip or with_empty_caption")
            null = params["empty_caption"]
            tokens = D.fit_tokens(tokens, clip_cfg.context_length, clip_cfg.pad_id)
            b = tokens.shape[0]
            states, raw = encode_text(clip_cfg, params["clip"], tokens, normalize=False)
            mask = text_mask(clip_cfg, tokens)
            text_emb = unit(raw) if prior_cfg.unit_text_emb else raw
            if prior_cfg.uncond == "empty_caption":
                p_uncond = D.batched({
                    "text_emb": unit(null["emb"]) if prior_cfg.unit_text_emb else null["emb"],
                    "text_states": null["states"], "text_mask": null["valid"]}, b)
            if dec_cfg.clip_text_width > 0:
                clip_text = {"emb": raw, "states": states, "valid": mask}
                uncond_clip_text = D.batched(null, b)
        emb = prior_embeddings(prior_cfg, params["prior"], text_emb, states, tokens, r_prior,
                               prior_scale, schedule=p_schedule, method=s.prior_method,
                               eta=s.prior_eta, num_candidates=s.num_candidates,
                               text_mask=mask, uncond=p_uncond, batch_sharding=split)
        x = decode(dec_cfg, params["decoder"], emb, r_dec, decoder_scale,
                   schedule=dec_schedule, method=s.decoder_method, eta=s.decoder_eta,
                   tokens=tokens if dec_cfg.use_text else None, clip_text=clip_text,
                   uncond_clip_text=uncond_clip_text, batch_sharding=split)
        return upsample_chain(ups, params["upsamplers"], x, r_up, schedules=up_schedules,
                              method=s.upsampler_method, eta=s.upsampler_eta,
                              batch_sharding=split)

    return jax.jit(text_to_image)


def check_prompts(captions: Sequence[str] | str) -> list[str]:
    """The prompt list, or ValueError for an empty list or blank prompts."""
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    if not captions:
        raise ValueError("no prompts given: pass a non-empty list of captions")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"prompt(s) at position {', '.join(map(str, bad))} are empty or only "
                         f"whitespace; every prompt needs some text")
    return captions


def generate(unclip: UnCLIP, captions: Sequence[str], seed: int = 0, *,
             prior_guidance: float | None = None, decoder_guidance: float | None = None,
             split: bool = True, mesh: jax.sharding.Mesh | None = None,
             **settings) -> np.ndarray:
    """uint8 images ``[B, H, W, 3]`` for ``captions`` (tokenized on the host, then the jitted
    chain). ``settings``: the fields of :class:`Settings`; guidance defaults to the configs'.
    ``split``: spread the batch over the devices when it divides evenly (:func:`sampling_mesh`:
    with several processes, over every process's devices — each process must then make the
    same call; the same images as on one device). ``mesh``: split over this one-axis mesh
    instead (e.g. :func:`unclip_jax.core.sharding.rows_mesh`; the batch must divide by its size)."""
    captions = check_prompts(captions)
    if unclip.tokenizer is None:
        raise ValueError("this UnCLIP has no tokenizer; pass token ids to make_text_to_image")
    if mesh is None:
        mesh = sampling_mesh(len(captions)) if split else None
    elif len(captions) % mesh.size:
        raise ValueError(f"{len(captions)} captions do not split over the {mesh.size} devices "
                         f"of the mesh; give a multiple of {mesh.size}")
    fn = make_text_to_image(unclip, settings_from(**settings), mesh)
    tokens = unclip.tokenizer.encode(captions, unclip.clip.context_length)
    params = unclip.params
    if mesh is not None:
        tokens = place_batch(tokens, mesh)
        params = replicated_params(unclip, mesh)
    guidance = (jnp.float32(unclip.prior.guidance_scale if prior_guidance is None
                            else prior_guidance),
                jnp.float32(unclip.decoder.guidance_scale if decoder_guidance is None
                            else decoder_guidance))
    return to_uint8(sharding.fetch(fn(params, tokens, jax.random.PRNGKey(seed), guidance)))


# ============================================================================ judge scores


def score_prompts(unclip: UnCLIP, prompts: Sequence[str], seed: int = 0, *,
                  batch_size: int = 16, **settings) -> dict:
    """Generate one image per captioned-shapes prompt and read it back with the judge
    (:func:`unclip_jax.core.shapes.score_caption` at the output resolution).

    Returns fractions ``single_colour_shape`` (one-object prompts: colour and shape right),
    ``two_both_colour_shape`` (two-object prompts: both objects' colour and shape right),
    ``relation`` (two-object prompts: the relation right), ``exact``, and the counts
    ``num_single`` / ``num_two``; a fraction is None where no prompt of its kind was given.
    """
    from unclip_jax.train.eval.metrics import judge_scores

    prompts = check_prompts(prompts)
    images = np.concatenate([
        generate(unclip, prompts[i:i + batch_size], seed + i, **settings)
        for i in range(0, len(prompts), batch_size)])
    return judge_scores(images, prompts)


__all__ = ["ClipBPE", "Settings", "UnCLIP", "check_chain", "check_prompts", "check_tokenizer",
           "decode", "decoder_conds", "decoder_schedule", "encode_text",
           "generate", "load_tokenizer", "load_unclip", "make_text_to_image",
           "needs_empty_caption", "prior_embeddings", "prior_schedule", "replicated_params",
           "place_batch", "sampling_mesh", "spans_processes", "score_prompts",
           "settings_from", "stage_denoiser", "stage_schedule", "text_mask", "to_uint8", "unit",
           "upsample_chain", "upsampler_schedules", "upsampler_stages", "with_empty_caption"]
