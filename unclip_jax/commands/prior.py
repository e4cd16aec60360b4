"""``unclip-jax embed`` (cache a frozen CLIP's embeddings) and ``unclip-jax sample-prior``."""

from __future__ import annotations

from pathlib import Path


def _embed(args) -> None:
    import dataclasses

    from unclip_jax.train import embeddings, runs
    from unclip_jax.train.tasks import ensure_dataset

    data = runs.load_config(args.clip).data
    if args.data:
        data = dataclasses.replace(data, name=args.data)
    if args.data_dir:
        data = dataclasses.replace(data, data_dir=args.data_dir)
    ensure_dataset(data)
    for split in args.split:
        out = embeddings.cache_embeddings(args.clip, data, split, args.out,
                                          batch_size=args.batch_size,
                                          shard_size=args.shard_size,
                                          tokenizer_path=args.tokenizer)
        print(f"cached {len(embeddings.load_split(args.out, split)['index'])} examples → {out}")


def _sample_prior(args) -> None:
    import jax
    import numpy as np

    from unclip_jax.core.text import Tokenizer
    from unclip_jax.train import runs

    captions = list(args.caption)
    if args.captions_file:
        captions += [line.strip() for line in Path(args.captions_file).read_text().splitlines()
                     if line.strip()]
    if not captions:
        raise ValueError("give captions with --caption TEXT (repeatable) or --captions-file")
    settings = {k: v for k, v in dict(sample_steps=args.steps, guidance_scale=args.guidance_scale,
                                      num_candidates=args.num_candidates, eta=args.eta).items()
                if v is not None}
    sampler = runs.load_prior(args.workdir, **settings)
    clip = args.clip or sampler.cfg.clip_workdir
    if not clip:
        raise ValueError("the prior's config names no CLIP workdir; pass --clip")
    frozen = runs.load_clip(clip)
    tokens = Tokenizer.load(runs.tokenizer_path(clip)).encode(captions,
                                                              frozen.config.context_length)
    text = jax.jit(type(frozen).encode_text)(frozen, tokens)
    inputs = {"text_emb": np.asarray(text["emb"]), "text_states": np.asarray(text["states"]),
              "text_tokens": np.asarray(tokens, np.int32)}
    emb = np.asarray(sampler(inputs, jax.random.PRNGKey(args.seed)))
    if jax.process_index() == 0:            # several processes: one writer
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, emb)
    cos = np.sum(emb * inputs["text_emb"], axis=-1)
    print(f"wrote {args.out}: {emb.shape[0]} image embeddings of dim {emb.shape[1]} "
          f"(mean cosine to the text embedding {cos.mean():.3f})")


def add_commands(subparsers) -> None:
    q = subparsers.add_parser("embed", help="cache a trained CLIP's embeddings of a dataset split")
    q.add_argument("--clip", required=True, help="workdir of a trained CLIP run")
    q.add_argument("--data", default=None, help="dataset name (default: the CLIP run's)")
    q.add_argument("--data-dir", default=None)
    q.add_argument("--split", action="append", required=True, help="repeatable")
    q.add_argument("--out", required=True, help="cache folder (meta.json, <split>/shard_*.npz)")
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--shard-size", type=int, default=4096)
    q.add_argument("--tokenizer", default=None, help="default: the CLIP run's tokenizer")
    q.set_defaults(fn=_embed)

    q = subparsers.add_parser("sample-prior",
                              help="sample CLIP image embeddings for captions (.npy)")
    q.add_argument("--workdir", required=True, help="workdir of a trained diffusion prior")
    q.add_argument("--caption", action="append", default=[])
    q.add_argument("--captions-file", default=None, help="one caption per line")
    q.add_argument("--clip", default=None, help="default: the prior's model.clip_workdir")
    q.add_argument("--out", required=True, help="output .npy, [N, E] float32")
    q.add_argument("--steps", type=int, default=None)
    q.add_argument("--guidance-scale", type=float, default=None)
    q.add_argument("--num-candidates", type=int, default=None)
    q.add_argument("--eta", type=float, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_sample_prior)
