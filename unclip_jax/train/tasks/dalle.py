"""The dVAE and DALL·E tasks (Ramesh et al. 2021): the dVAE on images alone (its evaluation:
reconstruction PSNR and codebook use, with a picture); DALL·E on caption tokens followed by the
frozen dVAE's codes of the image."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax.core import sharding

from unclip_jax.data import input_pipeline

from unclip_jax.train import runs
from unclip_jax.models import dalle as DL
from unclip_jax.models import dvae as V
from unclip_jax.train.loop import Task
from unclip_jax.core.text import Tokenizer
from unclip_jax.train.tasks.common import (ema_or_raw, ensure_dataset, ensure_tokenizer,
                                           image_grid, sample_placer, tokenizer_path,
                                           validation_rows)
from unclip_jax.train.tasks.evals import Generated


def dvae_task(cfg, workdir):
    """``(cfg, Task)`` training the dVAE on ``cfg.data``'s images (no tokenizer).

    The evaluation reconstructs validation images with argmax codes (up to 8 batches) and
    reports ``mse``/``psnr`` on [0, 1] pixels (PSNR of the pooled MSE), and codebook usage over
    all those cells: ``code_perplexity`` (exp entropy of the token histogram) and
    ``used_fraction`` (codes used at least once / K). It also writes ``recon_<step>.png``
    (originals above reconstructions) into the workdir.
    """
    ensure_dataset(cfg.data)
    model_cfg = dataclasses.replace(cfg.model, image_size=cfg.data.image_size)
    V.grid_size(model_cfg.image_size, model_cfg.num_groups)
    V.tau_at(0, model_cfg), V.beta_at(0, model_cfg)            # schedule names fail here, early
    V.pixel_log_prob(jnp.full((1, 3), 0.5), jnp.zeros((1, 6)), model_cfg)    # likelihood too
    cfg = dataclasses.replace(cfg, model=model_cfg)
    model = V.DVAE(model_cfg)
    workdir = Path(workdir)

    def batches(start, mesh):
        stream = input_pipeline.make_batches(cfg.data, "train", batch_size=cfg.train.batch_size,
                                             train=True, start=start)
        return input_pipeline.MappedBatches(stream, V.with_step, mesh)

    @V.jit
    def reconstruct(params, images):
        tokens = V.encode(model, params, images)
        return tokens, V.decode(model, params, tokens)

    def evaluate(state, step) -> dict:
        params = ema_or_raw(cfg, state)
        # every process reads the whole batch (one replicated input); results gathered whole
        val = input_pipeline.make_batches(cfg.data, "validation",
                                          batch_size=cfg.train.batch_size, train=False,
                                          process_index=0, process_count=1)
        sq_err, n_values = 0.0, 0
        counts = np.zeros(model_cfg.vocab_size, np.int64)
        first = None
        for _, b in zip(range(8), val):
            keep = np.asarray(b["mask"])
            tokens, recon = sharding.fetch(reconstruct(params, b["image"]))
            orig01, recon01 = (b["image"][keep] + 1) / 2, (recon[keep] + 1) / 2
            sq_err += float(np.sum(np.square(recon01 - orig01, dtype=np.float64)))
            n_values += orig01.size
            counts += np.bincount(tokens[keep].ravel(), minlength=model_cfg.vocab_size)
            if first is None:
                first = (b["image"][:8], recon[:8])
        mse = sq_err / max(n_values, 1)
        p = counts / max(counts.sum(), 1)
        entropy = -float(np.sum(p[p > 0] * np.log(p[p > 0])))
        if first is not None and jax.process_index() == 0:
            Image.fromarray(image_grid(list(first))).save(workdir / f"recon_{step}.png")
        return {"mse": mse, "psnr": float(V.psnr(mse)), "code_perplexity": math.exp(entropy),
                "used_fraction": float(np.mean(counts > 0))}

    task = Task(
        init=lambda rng, b: model.init(rng, b["image"]),
        loss=lambda params, batch, rng: V.loss_fn(model, params, batch, rng),
        batches=batches,
        example=V.dummy_inputs(model_cfg, cfg.train.batch_size),
        evaluate=evaluate,
    )
    return cfg, task


def dalle_task(cfg, workdir: str | Path):
    """The "dalle" task: text from the tokenizer, images → codes of the frozen
    ``model.dvae_workdir`` dVAE. The evaluation reports validation losses and, on captioned
    shapes, the judged colour+shape accuracy of samples (temperature 1, no reranking) for
    held-out single-object test prompts."""
    ensure_dataset(cfg.data)
    tok = ensure_tokenizer(cfg.data, workdir)
    dvae_model, dvae_params = runs.load_dvae(cfg.model.dvae_workdir)
    dcfg = dvae_model.config
    if dcfg.image_size != cfg.data.image_size:
        raise ValueError(f"the dVAE at {cfg.model.dvae_workdir!r} was trained on "
                         f"{dcfg.image_size} px images but data.image_size is "
                         f"{cfg.data.image_size}; set data.image_size={dcfg.image_size}")
    mcfg = dataclasses.replace(cfg.model, text_vocab_size=tok.vocab_size,
                               image_vocab_size=dcfg.vocab_size, grid_size=dcfg.grid_size,
                               text_length=cfg.data.context_length, pad_id=tok.pad_id)
    DL.layer_kinds(mcfg)
    DL.attention_mask("full", 1, mcfg.grid_size, mcfg.conv_kernel)   # config errors, early
    cfg = dataclasses.replace(cfg, model=mcfg)
    model = DL.DalleTransformer(mcfg)
    # The frozen dVAE encodes each process's own rows on that process's devices: a
    # process-local program (under the run's mesh its logical constraints would make it a
    # global one, fed different rows by every process).
    local = sharding.local_mesh()
    local_params = sharding.from_host(dvae_params, sharding.replicated(local))
    encode = V.jit(lambda p, images: V.encode(dvae_model, p, images))

    def to_codes(position, raw):
        """Text tokens and the frozen dVAE's codes of the images."""
        with jax.set_mesh(local):
            codes = np.asarray(encode(local_params, raw["image"]))
        return {"text": np.asarray(raw["tokens"], np.int32),
                "image_tokens": codes.reshape(len(codes), -1).astype(np.int32)}

    def batches(start, mesh):
        raw = input_pipeline.make_batches(cfg.data, "train", batch_size=cfg.train.batch_size,
                                          tokenizer=tok, train=True, start=start)
        return input_pipeline.MappedBatches(raw, to_codes, mesh)

    def evaluate(state, step) -> dict:
        params = ema_or_raw(cfg, state)
        # every process reads the whole batch (one replicated input); results gathered whole
        val = input_pipeline.MappedBatches(input_pipeline.make_batches(
            cfg.data, "validation", batch_size=cfg.train.batch_size, tokenizer=tok,
            train=False, process_index=0, process_count=1), to_codes)
        loss = jax.jit(lambda p, b: DL.loss_fn(model, p, b)[1])
        parts = [sharding.fetch(loss(params, b)) for _, b in zip(range(4), val)]
        out = {f"val_{k}": float(np.mean([p[k] for p in parts]))
               for k in ("text_loss", "image_loss", "image_accuracy")}
        if cfg.data.name.startswith("captioned_shapes"):
            out.update(DL.shapes_accuracy(mcfg, params, tok, dvae_model, dvae_params,
                                       num_prompts=32, seed=step))
        return out

    task = Task(
        init=lambda rng, b: model.init(rng, DL.stream(mcfg, b["text"], b["image_tokens"])[:, :-1]),
        loss=lambda params, batch, rng: DL.loss_fn(model, params, batch, rng),
        batches=batches,
        example=DL.dummy_inputs(mcfg, cfg.train.batch_size),
        evaluate=evaluate,
    )
    return cfg, task


def dalle_generate(cfg, workdir: str | Path, n: int):
    """``generate(state) -> Generated``: DALL·E's samples (temperature 1, no guidance, no
    reranking, a fixed seed) for the captions of the first ``n`` validation examples, decoded by
    the frozen dVAE; ``real`` = those examples' images."""
    mcfg = cfg.model
    tok = Tokenizer.load(tokenizer_path(cfg.data, workdir))
    batch = validation_rows(cfg, n, tok)
    dvae_model, dvae_params = runs.load_dvae(mcfg.dvae_workdir)
    draw = jax.jit(lambda params, text, rng: V.decode(dvae_model, dvae_params,
                                                      DL.sample(mcfg, params, text, rng)))
    text = sample_placer(cfg, n)(np.asarray(batch["tokens"], np.int32))

    def generate(state) -> Generated:
        out = draw(ema_or_raw(cfg, state), text, jax.random.PRNGKey(cfg.train.seed))
        return Generated(sharding.fetch(out)[:n], [str(c) for c in batch["caption"]],
                         real=batch["image"])

    return generate


def dalle_sample_grid(cfg, workdir: str | Path):
    """``(state, step) -> {"dalle": grid}``: :func:`dalle_generate` for the first
    ``train.sample_count`` validation examples. Rows: their images, the samples."""
    generate = dalle_generate(cfg, workdir, cfg.train.sample_count)

    def samples(state, step) -> dict:
        out = generate(state)
        return {"dalle": image_grid([out.real, out.images])}

    return samples
