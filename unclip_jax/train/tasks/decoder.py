"""The decoder and upsampler tasks (unCLIP §2.1, §2.2) and the decoder's sample grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core import sharding

from unclip_jax.data import input_pipeline

from unclip_jax.train import embeddings, runs
from unclip_jax.core.config import ExperimentConfig
from unclip_jax.models import decoder as D
from unclip_jax.models import sampling as S
from unclip_jax.models.clip import FrozenCLIP
from unclip_jax.core.text import Tokenizer
from unclip_jax.train.loop import Task
from unclip_jax.train.tasks.common import (ema_or_raw, ensure_dataset, ensure_tokenizer,
                                           image_grid, sample_placer, tokenizer_path,
                                           validation_rows)
from unclip_jax.train.tasks.evals import Generated


def decoder_task(cfg, workdir):
    """The decoder's training task (registered as "decoder"): the frozen CLIP embeds every
    batch's images (or the embedding cache supplies them, ``model.embeddings_dir``)."""
    mcfg: D.DecoderConfig = cfg.model
    clip = runs.load_clip(mcfg.clip_workdir)
    clip_cfg = clip.config
    ensure_dataset(cfg.data)
    tok = ensure_tokenizer(cfg.data, workdir)
    mcfg = dataclasses.replace(
        mcfg, image_size=cfg.data.image_size, clip_dim=clip_cfg.embed_dim,
        clip_image_size=clip_cfg.image_size, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
        context_length=cfg.data.context_length,
        clip_text_width=clip_cfg.text_width if mcfg.clip_text_width > 0 else 0,
        repa_dim=clip_cfg.vision_width if mcfg.repa_weight > 0 else 0)
    if mcfg.clip_text_width > 0 and cfg.data.context_length != clip_cfg.context_length:
        raise ValueError(f"data.context_length {cfg.data.context_length} differs from the "
                         f"CLIP's context_length {clip_cfg.context_length}; a decoder reading "
                         f"CLIP text features needs the CLIP's")
    D.check_decoder_config(mcfg)
    D.check_repa_grid(mcfg, clip_cfg.image_size // clip_cfg.patch_size)
    cfg = dataclasses.replace(cfg, model=mcfg)
    text_null = None
    if mcfg.clip_text_width > 0:
        text_null = D.empty_caption_features(clip, tok, mcfg.context_length)
    rows = None
    if mcfg.embeddings_dir:
        rows = {"image_emb": cached_image_embeddings(mcfg.embeddings_dir, mcfg.clip_workdir,
                                                     cfg.data)}

    def loss(params, batch, rng):
        tokens = batch["tokens"] if mcfg.use_text else None
        clip_text = (D.decoder_text_features(clip.encode_text(batch["tokens"]))
                     if text_null is not None else None)
        image_emb = batch["image_emb"] if rows is not None else clip.embed_images(batch["image"])
        repa_target = (clip.image_patch_tokens(batch["image"]) if mcfg.repa_weight > 0
                       else None)
        return D.decoder_loss(params, mcfg, batch["image"], image_emb, tokens, rng,
                              clip_text, text_null, repa_target)

    def batches(start, mesh):
        return input_pipeline.make_batches(cfg.data, "train", batch_size=cfg.train.batch_size,
                                           tokenizer=tok, mesh=mesh, train=True, start=start,
                                           row_features=rows)

    b, s = cfg.train.batch_size, mcfg.image_size
    example = {"image": np.zeros((b, s, s, 3), np.float32),
               "tokens": np.zeros((b, mcfg.context_length), np.int32)}
    if rows is not None:
        example["image_emb"] = np.zeros((b, mcfg.clip_dim), np.float32)
    task = Task(init=lambda rng, batch: D.init_decoder(mcfg, rng, 1), loss=loss,
                batches=batches, example=example)
    return cfg, task


def cached_image_embeddings(embeddings_dir: str, clip_workdir: str, data_cfg) -> np.ndarray:
    """``[N, E]`` float32 CLIP image embeddings of the training split, row ``k`` that of source
    example ``k``, from the embedding cache (built from ``clip_workdir`` when missing, as the
    prior does). The cache must come from the decoder's own CLIP and dataset, and the images
    must reach the decoder unaugmented (the cached embedding is that of the stored image)."""
    if data_cfg.random_crop or data_cfg.colour_drop:
        raise ValueError("model.embeddings_dir holds the embeddings of the stored images, but "
                         "data.random_crop / data.colour_drop change the images the decoder "
                         "sees; accepted: both off, or embeddings_dir='' (embed every batch)")
    meta = embeddings.ensure_cache(embeddings_dir, clip_workdir, data_cfg, ("train",))
    if Path(meta["clip_workdir"]).resolve() != Path(clip_workdir).resolve():
        raise ValueError(f"the embedding cache {embeddings_dir!r} was made by the CLIP "
                         f"{meta['clip_workdir']!r}, the decoder is conditioned on "
                         f"{clip_workdir!r}; accepted: a cache of model.clip_workdir's CLIP")
    if meta.get("dataset", data_cfg.name) != data_cfg.name:
        raise ValueError(f"the embedding cache {embeddings_dir!r} holds {meta['dataset']!r}, "
                         f"the decoder trains on {data_cfg.name!r}")
    return embeddings.load_split(embeddings_dir, "train")["image_emb"].astype(np.float32)


def upsampler_task(cfg, workdir):
    """The upsampler's training task (registered as "upsampler")."""
    mcfg: D.UpsamplerConfig = dataclasses.replace(cfg.model, image_size=cfg.data.image_size)
    D.check_upsampler_config(mcfg)
    cfg = dataclasses.replace(cfg, model=mcfg)
    ensure_dataset(cfg.data)

    def batches(start, mesh):
        return input_pipeline.make_batches(cfg.data, "train", batch_size=cfg.train.batch_size,
                                           mesh=mesh, train=True, start=start)

    s = mcfg.image_size
    example = {"image": np.zeros((cfg.train.batch_size, s, s, 3), np.float32)}
    task = Task(init=lambda rng, batch: D.init_upsampler(mcfg, rng, 1),
                loss=lambda params, batch, rng: D.upsampler_loss(params, mcfg, batch["image"],
                                                                 rng),
                batches=batches, example=example)
    return cfg, task


def decoder_generate(cfg: ExperimentConfig, workdir: str | Path, n: int):
    """``generate(state) -> Generated``: the decoder's samples from the CLIP image embeddings
    (and captions) of the first ``n`` validation images, with a fixed seed (``train.seed``)
    and the model's own sampling settings (``sample_steps``, guidance), through
    ``models.sampling.sample_images`` (the shared jitted sampler) with the batch sharded as the
    training batch is (EMA params when the run keeps them)."""
    mcfg = cfg.model
    clip = runs.load_clip(mcfg.clip_workdir)
    tok = Tokenizer.load(tokenizer_path(cfg.data, workdir))
    batch = validation_rows(cfg, n, tok)
    images, tokens = batch["image"], batch["tokens"]
    emb = np.asarray(jax.jit(FrozenCLIP.embed_images)(clip, images))
    clip_text = uncond_text = None
    if mcfg.clip_text_width > 0:
        clip_text = jax.tree.map(np.asarray, D.decoder_text_features(clip.encode_text(tokens)))
        uncond_text = jax.tree.map(np.asarray, D.batched(
            D.empty_caption_features(clip, tok, mcfg.context_length), n))
    place = sample_placer(cfg, n)

    def generate(state) -> Generated:
        out = S.sample_images(ema_or_raw(cfg, state), mcfg, place(emb),
                              place(tokens) if mcfg.use_text else None,
                              rng=jax.random.PRNGKey(cfg.train.seed),
                              clip_text=place(clip_text) if clip_text is not None else None,
                              uncond_clip_text=(place(uncond_text) if uncond_text is not None
                                                else None))
        return Generated(sharding.fetch(out)[:n], [str(c) for c in batch["caption"]],
                         real=images)

    return generate


def decoder_sample_grid(cfg: ExperimentConfig, workdir: str | Path):
    """``(state, step) -> {"decoder": grid}``: :func:`decoder_generate` for the first
    ``train.sample_count`` validation images. Rows: the validation images, the samples."""
    generate = decoder_generate(cfg, workdir, cfg.train.sample_count)

    def samples(state, step) -> dict:
        out = generate(state)
        return {"decoder": image_grid([out.real, out.images])}

    return samples


def upsampler_generate(cfg: ExperimentConfig, workdir: str | Path, n: int):
    """``generate(state) -> Generated``: the first ``n`` validation images box-downsampled by
    the factor (as in training, without the augmentation) and upsampled with the model's own
    sampler settings and a fixed seed; ``real`` = the images."""
    mcfg = cfg.model
    batch = validation_rows(cfg, n)
    real = batch["image"]
    low = np.asarray(D.box_downsample(jnp.asarray(real, jnp.float32), mcfg.factor))
    place = sample_placer(cfg, n)

    def generate(state) -> Generated:
        out = S.upsample_images(ema_or_raw(cfg, state), mcfg, place(low),
                                rng=jax.random.PRNGKey(cfg.train.seed))
        return Generated(sharding.fetch(out)[:n], [str(c) for c in batch["caption"]], real=real,
                         inputs=low)

    return generate


def upsampler_sample_grid(cfg: ExperimentConfig, workdir: str | Path):
    """``(state, step) -> {"upsampler": grid}``: :func:`upsampler_generate` for the first
    ``train.sample_count`` validation images. Rows: the low-res input (nearest-neighbour
    enlarged), the samples, the real images."""
    f = cfg.model.factor
    generate = upsampler_generate(cfg, workdir, cfg.train.sample_count)

    def samples(state, step) -> dict:
        out = generate(state)
        shown = out.inputs.repeat(f, axis=1).repeat(f, axis=2)
        return {"upsampler": image_grid([shown, out.images, out.real])}

    return samples
