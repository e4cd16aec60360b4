"""Ablation: the decoder's classifier-free guidance scale (unCLIP Fig. 10/11 form).

The diffusion prior's embeddings are drawn once per prompt and seed; only the decoder's
guidance scale changes between rows (DDIM 50 steps, η 0), so every difference is the
decoder's. The paper's trade-off: more guidance raises CLIP score (fidelity to the prompt)
and, past a point, costs FID (diversity / realism). Writes ``experiments/ablations/
guidance.png`` (FD_CLIP and CLIP score against scale; FD_CLIP against CLIP score).

    python experiments/ablations/guidance.py [--scales 1 1.5 2 3 4 6] [--num-per-kind 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 32
PLOT = Path(__file__).resolve().parent / "guidance.png"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    p.add_argument("--num-per-kind", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--decoder", default=None, help="decoder run (default: the demo's)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    chain, clip, prompts, scenes, ref = common.setup(args.num_per_kind, args.seeds,
                                                     args.decoder)
    drawn = common.prior_batches(chain, prompts, args.seeds, BATCH)
    mode = "image+caption" if chain.dec_cfg.use_text else "image"
    rows = {}
    for scale in args.scales:
        acc, t0 = common.RowMetrics(clip), time.perf_counter()
        for seed, b, sl, inp, emb in drawn:
            images = common.decode(chain, emb, inp["text_tokens"], 1000 * seed + b,
                                   scale=scale, steps=args.steps, mode=mode)
            acc.update(images, prompts[sl], ref.text_feats[sl], seed)
        rows[scale] = dict(acc.result(ref.stats), seconds=time.perf_counter() - t0)
        print(scale, {k: v for k, v in rows[scale].items() if not isinstance(v, dict)},
              flush=True)

    prov = common.provenance(chain)
    data = {"rows": {str(k): v for k, v in rows.items()}, "fd_floor": ref.fd_floor,
            "clip_score_real": ref.clip_score_real, "decoder": str(chain.decoder_workdir),
            "mode": mode, "prompts": len(prompts), "seeds": args.seeds, **prov}
    common.save_json("guidance", data)
    scales = list(rows)
    fd = [rows[s]["fd_clip"] for s in scales]
    cs = [rows[s]["clip_score"] for s in scales]
    common.plot_panels(PLOT, [
        dict(title="FD_CLIP vs guidance scale (lower is better)", xlabel="decoder guidance scale",
             ylabel="FD_CLIP", series=[("pooled", scales, fd)] + [
                 (f"seed {sd}", scales, [rows[s]["fd_clip_per_seed"][sd] for s in scales])
                 for sd in args.seeds]),
        dict(title="CLIP score vs guidance scale (higher is better)",
             xlabel="decoder guidance scale", ylabel="CLIP score", series=[("", scales, cs)]),
        dict(title="trade-off: FD_CLIP vs CLIP score (labels: scale)", xlabel="CLIP score",
             ylabel="FD_CLIP", series=[("", cs, fd)], annotate=[f"{s:g}" for s in scales]),
    ])
    body = render(data, args, rows, time.perf_counter() - t_start)
    print(body)
    if not args.no_write:
        common.write_group("guidance", body)
    return data


def render(data: dict, args, rows: dict, wall: float) -> str:
    n = data["prompts"]
    best_fd = min(rows, key=lambda s: rows[s]["fd_clip"])
    best_cs = max(rows, key=lambda s: rows[s]["clip_score"])
    table = common.table(["decoder guidance"] + common.METRIC_HEADER + ["s (all images)"],
                         [[f"{s:g}"] + common.row_cells(r) + [f"{r['seconds']:.0f}"]
                          for s, r in rows.items()])
    a, b = rows[best_cs], rows[min(rows)]
    cs_noise = common.within_noise(a["clip_score"], a["clip_score_se"], b["clip_score"],
                                   b["clip_score_se"])
    dec = data["decoder"].replace(str(common.ROOT) + "/", "")
    return "\n".join([
        "### Ablation: decoder guidance scale (unCLIP Fig. 10/11 form)",
        "",
        f"`python experiments/ablations/guidance.py --scales "
        f"{' '.join(f'{s:g}' for s in rows)} --num-per-kind {args.num_per_kind} --seeds "
        f"{' '.join(map(str, args.seeds))}{common.decoder_flag(args.decoder)}`. "
        f"Decoder `{dec}` ({data['mode']} conditioning), "
        f"DDIM {args.steps} steps, η 0; image embeddings from the diffusion prior "
        f"`runs/demo/prior` (its config: DDIM 64 steps, k = 2), drawn once and shared by all "
        f"scales. {n} held-out prompts ({n // 2} one-object, {n // 2} two-object) × "
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}) = "
        f"{n * len(args.seeds)} images per scale, judged and featurised at 32 px. Plot: "
        f"`experiments/ablations/guidance.png`.",
        "",
        table,
        "",
        f"FD_CLIP reference (renders of other held-out scenes vs the prompts' renders, "
        f"same count; a scale, not a bound): **{data['fd_floor']:.3f}**; "
        f"CLIP score of the prompts' own renders: {data['clip_score_real']:.1f}. Lowest FD_CLIP "
        f"at scale {best_fd:g}, highest CLIP score at scale {best_cs:g}; the CLIP-score gain "
        f"of scale {best_cs:g} over scale {min(rows):g} is "
        + ("**within noise** (< 2 s.e.)." if cs_noise else "beyond 2 s.e.")
        + " Per-seed FD values show the seed-to-seed spread at this sample count.",
        "",
        common.provenance_line(data, wall),
    ])


if __name__ == "__main__":
    main()
