"""``unclip-jax coco-fid``: zero-shot FID on MS-COCO of an unCLIP chain (unCLIP Table 2).

    unclip-jax coco-fid --coco /data/coco --inception pt_inception-2015-12-05-6726825d.pth \
        --clip runs/vitl14 --bpe-vocab bpe_simple_vocab_16e6.txt.gz \
        --prior karlo/prior --decoder karlo/decoder \
        --upsampler karlo/super_res_first --upsampler karlo/super_res_last \
        --num 30000 --out runs/coco_fid/karlo

The chain is loaded as ``unclip-jax sample`` loads it (the same model flags); the evaluation is
:mod:`unclip_jax.train.eval.coco` (layout, caption selection, real-image preprocessing, chunks and
resume are described there). Chunk ``k`` is sampled with the seed
``SeedSequence((seed, k))``, so the samples depend on ``--seed`` and ``--chunk-size`` only, not
on the number of devices or processes.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_commands(subparsers) -> None:
    from unclip_jax.commands.unclip import _add_model_args

    q = subparsers.add_parser("coco-fid", help="zero-shot FID and CLIP score on MS-COCO "
                                               "captions (resumable)")
    _add_model_args(q, out_help="output folder: per-chunk features, manifest.json, "
                                "results.json (a rerun continues what is there)")
    q.add_argument("--coco", required=True,
                   help="COCO folder: annotations/captions_val2014.json + val2014/, or the "
                        "official zips annotations_trainval2014.zip + val2014.zip")
    q.add_argument("--split", default="val2014", choices=("val2014", "val2017"))
    q.add_argument("--inception", required=True,
                   help="FID Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-"
                        "6726825d.pth, or .npz/.safetensors with its key names)")
    q.add_argument("--num", type=int, default=30_000, help="captions, one sample each "
                                                           "(paper: 30000)")
    q.add_argument("--subset-seed", type=int, default=0, help="which captions are chosen")
    q.add_argument("--resolution", type=int, default=256,
                   help="side the real images (centre crop) and samples are brought to")
    q.add_argument("--chunk-size", type=int, default=256,
                   help="captions per saved chunk (a multiple of the device count)")
    q.add_argument("--batch-size", type=int, default=64,
                   help="Inception and CLIP batch (rounded up to a multiple of the devices)")
    q.add_argument("--max-chunks", type=int, default=None,
                   help="compute at most this many new chunks, then stop (run again to go on)")
    q.add_argument("--devices", type=int, default=None,
                   help="devices per process to use (default: all)")
    q.add_argument("--workers", type=int, default=8, help="threads decoding real images")
    q.add_argument("--inception-size", type=int, default=299,
                   help="Inception working size (299 = FID; ≥ 75 only for quick checks)")
    q.add_argument("--no-clip-score", action="store_true", help="skip the CLIP score")
    q.add_argument("--prior-guidance", type=float, default=None)
    q.add_argument("--prior-steps", type=int, default=None)
    q.add_argument("--decoder-steps", type=int, default=None)
    q.add_argument("--candidates", type=int, default=None,
                   help="prior draws per caption, best by dot product kept (paper: 2)")
    q.set_defaults(fn=_coco_fid)


def _latest_step(workdir) -> int | None:
    """The newest checkpoint step folder of a run (recorded in the manifest)."""
    d = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    return max(steps) if steps else None


def _model_settings(args) -> dict:
    runs = {"clip": args.clip, "prior": args.prior, "decoder": args.decoder}
    runs.update({f"upsampler{i}": w for i, w in enumerate(args.upsampler)})
    out = {name: {"path": str(Path(w).resolve()), "step": _latest_step(w)}
           for name, w in runs.items()}
    tok = args.bpe_vocab or args.tokenizer
    out["tokenizer"] = str(Path(tok).resolve()) if tok else None
    return out


def _coco_fid(args) -> None:
    import numpy as np

    from unclip_jax.commands.unclip import _load
    from unclip_jax.core import sharding
    from unclip_jax.pipelines import unclip as U
    from unclip_jax.pipelines.convert import inception as convert_inception
    from unclip_jax.train.eval import coco, inception, metrics

    for name in ("num", "chunk_size", "batch_size", "resolution"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.max_chunks is not None and args.max_chunks < 0:
        raise ValueError(f"--max-chunks must be ≥ 0, got {args.max_chunks}")
    folder = coco.CocoFolder(args.coco, args.split)
    chosen = coco.select_captions(folder, args.num, args.subset_seed)
    weights = convert_inception.load_variables(args.inception)       # its own clear errors
    mesh = sharding.rows_mesh(args.devices)
    if args.chunk_size % mesh.size:
        raise ValueError(f"--chunk-size {args.chunk_size} does not split over the {mesh.size} "
                         f"devices; give a multiple of {mesh.size} (or fewer --devices)")
    batch = -(-args.batch_size // mesh.size) * mesh.size
    sampling = {"seed": args.seed, "prior_steps": args.prior_steps,
                "decoder_steps": args.decoder_steps, "candidates": args.candidates,
                "upsampler_steps": args.upsampler_steps, "prior_guidance": args.prior_guidance,
                "decoder_guidance": args.decoder_guidance}
    settings = {"split": args.split, "subset_seed": args.subset_seed,
                "captions_sha256": coco.captions_digest(chosen),
                "inception_sha256": coco.file_digest(args.inception),
                "inception_size": args.inception_size, "clip_score": not args.no_clip_score,
                "models": _model_settings(args), "sampling": sampling}

    model = _load(args)
    split = mesh if mesh.size > 1 else None
    options = dict(prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
                   num_candidates=args.candidates,
                   upsampler_steps=tuple(args.upsampler_steps) if args.upsampler_steps
                   else None)

    def sample(items, k):
        seed = int(np.random.SeedSequence((args.seed, k)).generate_state(1)[0] % (1 << 31))
        return U.generate(model, [c.caption for c in items], seed, split=False, mesh=split,
                          prior_guidance=args.prior_guidance,
                          decoder_guidance=args.decoder_guidance, **options)

    feats = inception.InceptionFeatures(weights, batch, args.inception_size, mesh=split)
    clip = None if args.no_clip_score else metrics.ClipFeatures.from_unclip(model, batch, split)
    result = coco.run(folder, chosen, args.out, sample=sample, inception=feats, clip=clip,
                      settings=settings, chunk_size=args.chunk_size,
                      resolution=args.resolution, mesh=mesh, max_chunks=args.max_chunks,
                      workers=args.workers)
    if result["complete"]:
        clip_text = ("" if result["clip_score"] is None
                     else f", CLIP score {result['clip_score']:.2f}")
        print(f"coco-fid: FID {result['fid']:.3f}{clip_text} on {result['num_samples']} "
              f"{args.split} captions → {Path(args.out) / coco.RESULTS}")
    else:
        print(json.dumps({k: result[k] for k in ("chunks_done", "num_chunks")}))
