"""The two priors' tasks (unCLIP §2.2): both train on the frozen CLIP's embedding cache
(:mod:`unclip_jax.train.embeddings`) through
:class:`unclip_jax.data.input_pipeline.EmbeddingBatches`."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core import sharding

from unclip_jax.data import input_pipeline

from unclip_jax.train import embeddings
from unclip_jax.train import runs
from unclip_jax.models import decoder as D
from unclip_jax.models import sampling as S
from unclip_jax.models import prior as P
from unclip_jax.models import prior_ar as PA
from unclip_jax.train.loop import Task
from unclip_jax.train.tasks.common import ema_or_raw, image_grid, sample_placer
from unclip_jax.train.tasks.evals import Generated


def prior_task(cfg, workdir):
    """``(cfg, Task)`` of the diffusion prior (task name ``"prior"``): trains on the embedding
    cache (built from ``model.clip_workdir`` when missing); the evaluation is the cosine of
    sampled and true image embeddings on validation captions."""
    mcfg: P.PriorConfig = cfg.model
    cache_dir = Path(mcfg.embeddings_dir or Path(workdir) / "embeddings")
    meta = embeddings.ensure_cache(cache_dir, mcfg.clip_workdir, cfg.data, ("train", "validation"))
    train = embeddings.load_split(cache_dir, "train")
    updates = dict(embed_dim=meta["embed_dim"], text_width=meta["text_width"],
                   context_length=meta["context_length"],
                   pad_id=int(meta.get("pad_id", mcfg.pad_id)),
                   embeddings_dir=str(cache_dir), clip_workdir=meta["clip_workdir"])
    if mcfg.normalization == "scale" and mcfg.embed_scale <= 0:
        updates["embed_scale"] = P.PAPER_SCALE_PER_SQRT_DIM * math.sqrt(meta["embed_dim"])
    if mcfg.normalization == "standardize" and not mcfg.embed_mean:
        emb = train["image_emb"].astype(np.float64)
        updates["embed_mean"] = tuple(float(v) for v in emb.mean(0))
        updates["embed_std"] = tuple(float(v) for v in emb.std(0) + 1e-6)
    mcfg = dataclasses.replace(mcfg, **updates)
    cfg = dataclasses.replace(cfg, model=mcfg)
    model = P.DiffusionPrior(mcfg)
    schedule = P.base_schedule(mcfg)
    bs = cfg.train.batch_size
    example = input_pipeline.EmbeddingBatches(train, bs, keys=P.BATCH_KEYS).batch(0)
    example = {k: np.zeros_like(v) for k, v in example.items()}
    val = embeddings.load_split(cache_dir, "validation")
    n_eval = min(256, len(val["index"]))

    def evaluate(state, step) -> dict:
        sampler = S.PriorSampler(model, ema_or_raw(cfg, state))
        inputs = {k: val[k][:n_eval] for k in ("text_emb", "text_states", "text_tokens")}
        emb = sharding.fetch(sampler(inputs, jax.random.PRNGKey(step)))   # whole, every host
        true = val["image_emb"][:n_eval]
        return {"val_cos": float(np.mean(np.sum(emb * true, -1))),
                "val_cos_text_baseline": float(np.mean(np.sum(inputs["text_emb"] * true, -1)))}

    task = Task(
        init=lambda rng, b: model.init(rng, jnp.zeros(b["image_emb"].shape, jnp.float32),
                                       jnp.zeros(b["image_emb"].shape[:1], jnp.int32),
                                       P.condition(mcfg, b)),
        loss=lambda params, batch, rng: P.loss_fn(model, params, batch, rng, schedule=schedule),
        batches=lambda start, mesh: input_pipeline.EmbeddingBatches(
            train, bs, seed=cfg.data.shuffle_seed, start=start, mesh=mesh, keys=P.BATCH_KEYS),
        example=example,
        evaluate=evaluate,
    )
    return cfg, task


def prior_ar_task(cfg, workdir: str | Path):
    """The "prior_ar" task: fit (or reload) the quantizers, train on cached CLIP embeddings."""
    mcfg: PA.ARPriorConfig = cfg.model
    train = embeddings.load_split(mcfg.embeddings_dir, "train")
    n, length, width = train["text_states"].shape
    mcfg = dataclasses.replace(mcfg, embed_dim=train["image_emb"].shape[1], text_length=length,
                               text_width=width)
    cfg = dataclasses.replace(cfg, model=mcfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / PA.QUANTIZER_FILE
    # Fitted once, by process 0, and read back by every process: hosts whose linear algebra
    # rounds differently must still quantize with the very same codes. On resume the file
    # keeps the codes the checkpoint was trained on.
    if sharding.is_main_process() and not path.is_file():
        pca = PA.PCAQuantizer.fit(train["image_emb"], mcfg.pca_dims, mcfg.num_buckets,
                               mcfg.quantization)
        sim = PA.SimilarityBuckets.fit(PA.similarities(train), mcfg.sim_buckets)
        PA.save_quantizers(path, pca, sim)
    sharding.barrier("prior_ar quantizers")
    pca, sim = PA.load_quantizers(path)
    if pca.dims != mcfg.pca_dims or pca.num_buckets != mcfg.num_buckets \
            or sim.num_buckets != mcfg.sim_buckets:
        raise ValueError(f"{path} was fitted with pca_dims={pca.dims}, num_buckets="
                         f"{pca.num_buckets}, sim_buckets={sim.num_buckets}; the config "
                         "differs — use another workdir")
    arrays = PA.model_arrays(train, pca, sim)
    model = PA.ARPrior(mcfg)
    try:
        val = embeddings.load_split(mcfg.embeddings_dir, "validation")
    except FileNotFoundError:
        val = None

    def evaluate(state, step) -> dict:
        if val is None:
            return {}
        params = ema_or_raw(cfg, state)
        m = min(len(val["index"]), 256)
        part = {k: v[:m] for k, v in val.items()}
        va = PA.model_arrays(part, pca, sim)
        loss, metrics = sharding.fetch(jax.jit(functools.partial(PA.loss_fn, model))(params, va))
        out = {"val_loss": float(loss), "val_code_accuracy": float(metrics["code_accuracy"])}
        sample = PA.make_sampler(mcfg, pca, sim)
        emb = sharding.fetch(sample(params, {k: va[k] for k in ("text_emb", "text_states",
                                                                 "text_tokens")},
                                    jax.random.PRNGKey(step)))
        out["sample_cos_image"] = float(np.mean(np.sum(emb * part["image_emb"], -1)))
        out["sample_cos_text"] = float(np.mean(np.sum(emb * part["text_emb"], -1)))
        out["real_cos_text"] = float(np.mean(PA.similarities(part)))
        # Retrieval: is the sample closer to its own caption's real image than to the others?
        out["sample_i2i_top1"] = float(np.mean(np.argmax(emb @ part["image_emb"].T, 1)
                                               == np.arange(m)))
        return out

    task = Task(
        init=lambda rng, b: model.init(rng, b["tokens"], PA.cond_inputs(b)),
        loss=lambda params, batch, rng: PA.loss_fn(model, params, batch, rng),
        batches=lambda start, mesh: input_pipeline.EmbeddingBatches(
            arrays, cfg.train.batch_size, seed=cfg.train.seed, start=start, mesh=mesh),
        example=PA.dummy_inputs(mcfg, cfg.train.batch_size),
        evaluate=evaluate,
    )
    return cfg, task


def prior_generate(cfg, workdir: str | Path, n: int):
    """``generate(state) -> Generated`` for both priors: image embeddings sampled (a fixed seed,
    the model's own settings) for the captions of the first ``n`` validation rows of the
    embedding cache, rendered by the trained decoder ``train.sample_decoder`` (its own sampler
    settings, the caption's tokens); ``real`` = the same decoder's images of the rows' true CLIP
    image embeddings, ``real_features`` = those embeddings."""
    mcfg = cfg.model
    if not cfg.train.sample_decoder:
        raise ValueError("the priors' sample grids and evaluations are images of the sampled "
                         "embeddings: set train.sample_decoder to a trained decoder run (e.g. "
                         "runs/demo/decoder), or train.sample_every=0 and train.evals=")
    dec_params, dcfg = runs.load_decoder(cfg.train.sample_decoder)
    if dcfg.clip_dim != mcfg.embed_dim or dcfg.clip_text_width > 0:
        raise ValueError(f"train.sample_decoder {cfg.train.sample_decoder!r} reads "
                         f"{dcfg.clip_dim}-d embeddings (clip_text_width {dcfg.clip_text_width}); "
                         f"the prior makes {mcfg.embed_dim}-d ones: accepted, a decoder of the "
                         f"prior's CLIP without CLIP text features")
    # the decoder's params on every device of the run's mesh (it samples inside it)
    dec_params = sharding.from_host(dec_params, sharding.replicated(sharding.make_mesh(cfg.mesh)))
    cache = mcfg.embeddings_dir or str(Path(workdir) / "embeddings")
    val = {k: v[:n] for k, v in embeddings.load_split(cache, "validation").items()}
    inputs = {"text_emb": val["text_emb"].astype(np.float32),
              "text_states": val["text_states"].astype(np.float32),
              "text_tokens": val["text_tokens"].astype(np.int32)}
    true_emb = val["image_emb"].astype(np.float32)
    if cfg.task == "prior_ar":
        pca, sim = PA.load_quantizers(Path(workdir) / PA.QUANTIZER_FILE)
        draw = PA.make_sampler(mcfg, pca, sim)
    else:
        def draw(params, inputs, rng):
            return S.PriorSampler(P.DiffusionPrior(mcfg), params)(inputs, rng)
    m = len(true_emb)
    place, place_both = sample_placer(cfg, m), sample_placer(cfg, 2 * m)
    tokens = None
    if dcfg.use_text:          # the captions' tokens for both rows: true, then sampled
        fitted = np.asarray(D.fit_tokens(jnp.asarray(inputs["text_tokens"]),
                                         dcfg.context_length, dcfg.pad_id))
        tokens = place_both(np.concatenate([fitted, fitted]))
    inputs = place(inputs)

    def generate(state) -> Generated:
        rng = jax.random.PRNGKey(cfg.train.seed)
        emb = sharding.fetch(draw(ema_or_raw(cfg, state), inputs, rng))[:m]
        images = sharding.fetch(S.sample_images(
            dec_params, dcfg, place_both(np.concatenate([true_emb, emb])), tokens,
            rng=jax.random.fold_in(rng, 1)))[:2 * m]
        return Generated(images[m:], [str(c) for c in val["caption"]], real=images[:m],
                         real_features=true_emb)

    return generate


def prior_sample_grid(cfg, workdir: str | Path):
    """``(state, step) -> {"prior": grid}``: :func:`prior_generate` for the first
    ``train.sample_count`` validation rows. Rows: the decoder's images of the true CLIP image
    embeddings, then of the prior's."""
    generate = prior_generate(cfg, workdir, cfg.train.sample_count)

    def samples(state, step) -> dict:
        out = generate(state)
        return {"prior": image_grid([out.real, out.images])}

    return samples
