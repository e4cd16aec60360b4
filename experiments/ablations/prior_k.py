"""Ablation: number of diffusion-prior candidates k (unCLIP §2.2: k = 2, best by dot product
with the text embedding).

For each k the prior draws ``k`` embeddings per caption and keeps the one most similar to the
caption's CLIP text embedding; the decoder (DDIM 50 steps, guidance 3) then renders it. The
first measure needs no decoder: the cosine between the kept embedding and the CLIP image
embedding of a render of the prompt's own scene (the "true" image embedding). The candidate
draws of different k are independent (the prior's key differs with the batch size), so the
comparison is paired: JAX's (partitionable) threefry gives the first ``B`` rows of a
``[k·B, E]`` normal draw equal to the ``[B, E]`` draw of the same key, and DDIM η = 0 adds no
further noise, so the first candidate of every k is the k = 1 embedding; a row differs from
k = 1 only where another candidate wins the rerank (the "reranked away" column).

    python experiments/ablations/prior_k.py [--ks 1 2 4] [--num-per-kind 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 32


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-per-kind", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--decoder", default=None, help="decoder run (default: the demo's)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    chain, clip, prompts, scenes, ref = common.setup(args.num_per_kind, args.seeds,
                                                     args.decoder)
    mode = "image+caption" if chain.dec_cfg.use_text else "image"
    rows, kept = {}, {}
    for k in args.ks:
        acc, cos, t0 = common.RowMetrics(clip), [], time.perf_counter()
        kept[k] = []
        for seed, b, sl, inp, emb in common.prior_batches(chain, prompts, args.seeds, BATCH,
                                                          num_candidates=k):
            unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            kept[k].append(unit)
            cos.append(np.sum(unit * ref.image_feats[sl], axis=1))
            images = common.decode(chain, emb, inp["text_tokens"], 1000 * seed + b,
                                   scale=args.guidance, steps=args.steps, mode=mode)
            acc.update(images, prompts[sl], ref.text_feats[sl], seed)
        c = np.concatenate(cos)
        rows[k] = dict(acc.result(ref.stats), emb_cos=float(c.mean()),
                       emb_cos_se=float(c.std(ddof=1) / np.sqrt(len(c))),
                       seconds=time.perf_counter() - t0)
        first = min(kept)
        rows[k]["reranked_away"] = float(np.mean(np.sum(
            np.concatenate(kept[k]) * np.concatenate(kept[first]), axis=1) < 1 - 1e-5))
        print(k, {kk: v for kk, v in rows[k].items() if not isinstance(v, dict)}, flush=True)

    prov = common.provenance(chain)
    data = {"rows": {str(k): v for k, v in rows.items()}, "fd_floor": ref.fd_floor,
            "clip_score_real": ref.clip_score_real, "decoder": str(chain.decoder_workdir),
            "mode": mode, "prompts": len(prompts), "seeds": args.seeds, **prov}
    common.save_json("prior_k", data)
    body = render(data, args, rows, time.perf_counter() - t_start)
    print(body)
    if not args.no_write:
        common.write_group("prior_k", body)
    return data


def render(data: dict, args, rows: dict, wall: float) -> str:
    n = data["prompts"]
    table = common.table(
        ["prior candidates k", f"reranked away from k = {min(rows)}",
         "cos(emb, true image emb)"] + common.METRIC_HEADER,
        [[str(k), f"{r['reranked_away']:.3f}", f"{r['emb_cos']:.4f} ± {r['emb_cos_se']:.4f}"]
         + common.row_cells(r)
         for k, r in rows.items()])
    ks = list(rows)
    a, b = rows[ks[0]], rows[ks[-1]]
    notes = [name for name, key in (("embedding cos", "emb_cos"), ("CLIP score", "clip_score"),
                                    ("fidelity", "fidelity"), ("binding", "binding"))
             if common.within_noise(a[key], a[key + "_se"], b[key], b[key + "_se"])]
    dec = data["decoder"].replace(str(common.ROOT) + "/", "")
    return "\n".join([
        "### Ablation: prior candidates k (rerank by dot product with the text embedding)",
        "",
        f"`python experiments/ablations/prior_k.py --ks {' '.join(map(str, ks))} "
        f"--num-per-kind {args.num_per_kind} --seeds {' '.join(map(str, args.seeds))}"
        f"{common.decoder_flag(args.decoder)}`. "
        f"Diffusion prior `runs/demo/prior` (DDIM 64 steps, guidance 1), decoder `{dec}` "
        f"({data['mode']} conditioning, DDIM {args.steps} steps, guidance {args.guidance}). "
        f"{n} held-out prompts ({n // 2} one-object, {n // 2} two-object) × "
        f"{len(args.seeds)} seeds = {n * len(args.seeds)} images per row, 32 px.",
        "",
        table,
        "",
        f"`cos` ± s.e.: the kept embedding against the CLIP image embedding of the prompt's own "
        f"render. FD_CLIP reference (other held-out scenes' renders; a scale, not a bound): "
        f"**{data['fd_floor']:.3f}**. k = {ks[0]} vs k = {ks[-1]}: "
        + (f"{', '.join(notes)} within noise (≤ 2 s.e.)." if notes else
           "every listed difference exceeds 2 s.e."),
        "",
        common.provenance_line(data, wall),
    ])


if __name__ == "__main__":
    main()
