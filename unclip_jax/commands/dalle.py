"""``unclip-jax sample-dalle``: DALL·E samples for captions, reranked by a CLIP, as a grid."""

from __future__ import annotations


def _sample_dalle(args) -> None:
    import jax
    import numpy as np

    from unclip_jax.core.images import save_grid
    from unclip_jax.pipelines.dalle import load_pipeline

    prompts = list(args.prompt)
    if not prompts:
        raise ValueError("give at least one --prompt TEXT")
    pipe, params = load_pipeline(args.workdir, args.clip)
    out = pipe.generate_reranked(params["dalle"], params["dvae"], params["clip"], prompts,
                                 jax.random.PRNGKey(args.seed),
                                 num_candidates=args.candidates,
                                 guidance_scale=args.guidance_scale,
                                 temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p)
    images, scores = np.asarray(out.images), np.asarray(out.scores)
    shown = images[:, :args.show] if args.show else images
    save_grid(list(shown), args.out, gap=0)     # several processes: process 0 writes
    for p, s, o in zip(prompts, scores, np.asarray(out.order)):
        print(f"{p!r}: CLIP scores best→worst {np.round(s, 2).tolist()} "
              f"(drawing order {o.tolist()})")
    print(f"wrote {args.out}: {len(prompts)} rows × {shown.shape[1]} candidates, best first")


def add_commands(subparsers) -> None:
    q = subparsers.add_parser("sample-dalle", help="DALL·E samples reranked by CLIP → grid PNG")
    q.add_argument("--workdir", required=True, help="a trained DALL·E run")
    q.add_argument("--prompt", action="append", default=[], help="caption (repeatable)")
    q.add_argument("--candidates", type=int, default=8, help="samples per caption (N)")
    q.add_argument("--show", type=int, default=0, help="keep only the best S per row (0: all)")
    q.add_argument("--clip", default=None, help="CLIP workdir (default: model.clip_workdir)")
    q.add_argument("--guidance-scale", type=float, default=1.0)
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--top-k", type=int, default=0)
    q.add_argument("--top-p", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="output PNG (rows = prompts, best first)")
    q.set_defaults(fn=_sample_dalle)
