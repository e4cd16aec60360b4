"""Ablation: what conditions the decoder — diffusion prior, AR prior, no prior, caption only.

unCLIP §5.1 / Fig. 8 compares, on one decoder, image embeddings from the diffusion prior, from
the AR prior, the CLIP *text* embedding fed as if it were an image embedding ("no prior"), and
GLIDE-style decoding from the caption alone. Here:

* decoder: the demo's (``runs/demo/decoder``, or ``--decoder``). It has the caption pathway
  (``text_layers=2``), so all four rows use one decoder: rows 1–3 give it the embedding *and*
  the caption, row 4 the learned null embedding and the caption. A decoder without a caption
  pathway serves rows 1–3 and row 4 is reported missing.
* diffusion prior: ``runs/demo/prior`` with its config's sampling (DDIM 64 steps, k = 2);
* AR prior: ``runs/demo/prior_ar`` (``experiments/shapes/prior_ar.py`` trained on the demo
  CLIP's embedding cache), temperature 1, guidance 1;
* decoder sampling: DDIM 50 steps, η = 0, guidance 3 (the demo's);

    python experiments/ablations/prior.py [--num-per-kind 32] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 32


def embed_fns(chain, ar_dir: Path):
    """name -> fn(text_inputs, rng) -> [B, E] image embeddings (or None for caption-only)."""
    from unclip_jax.train import runs

    fns = {}
    diffusion_prior = runs.load_prior(chain.prior_workdir)
    fns["diffusion prior"] = lambda inp, rng: diffusion_prior(inp, rng)
    if common.trained(ar_dir):
        ar = runs.load_prior_ar(ar_dir)
        fns["AR prior"] = lambda inp, rng: ar(inp, rng)
    fns["no prior (CLIP text emb)"] = lambda inp, rng: inp["text_emb"]
    return fns, diffusion_prior


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-per-kind", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--decoder", default=None,
                   help="decoder run (default: the demo's); one with a caption pathway adds the "
                   "caption-only row")
    p.add_argument("--prior-ar", default=str(common.DEMO / "prior_ar"))
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--missing-reason", default="train one with `--set model.text_layers=2`",
                   help="why the caption-decoder run is missing (printed when it is)")
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    chain, clip, prompts, scenes, ref = common.setup(args.num_per_kind, args.seeds,
                                                     args.decoder)
    has_text = chain.dec_cfg.use_text
    fns, dprior = embed_fns(chain, Path(args.prior_ar))
    rows = {name: ("image+caption" if has_text else "image", fn) for name, fn in fns.items()}
    if has_text:
        rows["caption only (null image emb)"] = ("caption", None)

    results = {}
    for name, (mode, fn) in rows.items():
        acc, cos, t0 = common.RowMetrics(clip), [], time.perf_counter()
        for seed in args.seeds:
            for b, sl in enumerate(common.batches(len(prompts), BATCH)):
                inp = common.text_inputs(chain, prompts[sl])
                key = jax.random.PRNGKey(1000 * seed + b)
                emb = (np.asarray(fn(inp, key), np.float32) if fn is not None
                       else np.zeros_like(inp["text_emb"]))
                if fn is not None:
                    cos.append(np.sum(emb / np.linalg.norm(emb, axis=1, keepdims=True)
                                      * ref.image_feats[sl], axis=1))
                images = common.decode(chain, emb, inp["text_tokens"], 1000 * seed + b,
                                       scale=args.guidance, steps=args.steps, mode=mode)
                acc.update(images, prompts[sl], ref.text_feats[sl], seed)
        r = acc.result(ref.stats)
        r.update(mode=mode, seconds=time.perf_counter() - t0,
                 emb_cos=float(np.mean(np.concatenate(cos))) if cos else None)
        results[name] = r
        print(name, {k: v for k, v in r.items() if not isinstance(v, dict)}, flush=True)

    prov = common.provenance(chain)
    data = {"rows": results, "fd_floor": ref.fd_floor, "clip_score_real": ref.clip_score_real,
            "decoder": str(chain.decoder_workdir), "prompts": len(prompts),
            "seeds": args.seeds, **prov}
    common.save_json("prior", data)
    body = render(data, args, has_text, dprior, time.perf_counter() - t_start)
    print(body)
    if not args.no_write:
        common.write_group("prior", body)
    return data


def render(data: dict, args, has_text: bool, dprior, wall: float) -> str:
    rows = data["rows"]
    n = data["prompts"]
    table = common.table(
        ["conditioning", "decoder input", "cos(emb, true image emb)"] + common.METRIC_HEADER,
        [[name, r["mode"], "—" if r["emb_cos"] is None else f"{r['emb_cos']:.3f}"]
         + common.row_cells(r) for name, r in rows.items()])
    rel = data["decoder"].replace(str(common.ROOT) + "/", "")
    dec = (f"`{rel}` (CLIP embedding + caption pathway)" if has_text
           else f"`{rel}` (CLIP embedding only, no caption pathway)")
    lines = [
        "### Ablation: prior (unCLIP §5.1, Fig. 8)",
        "",
        f"`python experiments/ablations/prior.py --num-per-kind {args.num_per_kind} --seeds "
        f"{' '.join(map(str, args.seeds))}{common.decoder_flag(args.decoder)}`. "
        f"{n} held-out prompts ({n // 2} one-object, "
        f"{n // 2} two-object, scene seed 7) × {len(args.seeds)} sampling seeds "
        f"({', '.join(map(str, args.seeds))}) = {n * len(args.seeds)} images per row, judged "
        f"at {32} px (decoder output, no upsampler). Decoder: {dec}; DDIM {args.steps} steps, "
        f"η 0, guidance {args.guidance}. Diffusion prior `runs/demo/prior`: DDIM "
        f"{dprior.steps} steps, guidance {dprior.guidance_scale}, k = {dprior.num_candidates}. "
        f"AR prior `{Path(args.prior_ar).resolve().relative_to(common.ROOT)}` "
        f"(`experiments/shapes/prior_ar.py` on the demo CLIP's cache, 3000 steps × batch 64), "
        f"temperature 1.",
        "",
        table,
        "",
        f"Fractions ± binomial s.e.; CLIP score ± s.e. of the mean. FD_CLIP is against the "
        f"prompts' own renders (CLIP-score ceiling of those renders: "
        f"{data['clip_score_real']:.1f}); the reference (renders of other held-out scenes; "
        f"a scale, not a bound) is **{data['fd_floor']:.3f}**. `cos` is the produced "
        f"embedding's cosine with the CLIP image embedding of the prompt's own render.",
    ]
    if not has_text:
        lines += ["", f"Caption-only decoding: **not measured** — decoder `{rel}` has "
                  f"`text_layers=0` (no caption input): {args.missing_reason}."]
    lines += ["", noise_note(rows), "", common.provenance_line(data, wall)]
    return "\n".join(lines)


def noise_note(rows: dict) -> str:
    """Which judge differences against the first row are within 2 standard errors."""
    names = list(rows)
    base, notes = rows[names[0]], []
    for other in names[1:]:
        r = rows[other]
        keys = [k for k in ("fidelity", "binding", "relation")
                if common.within_noise(base[k], base[k + "_se"], r[k], r[k + "_se"])]
        if keys:
            notes.append(f"{other} vs {names[0]}: {', '.join(keys)}")
    return ("Within noise (difference ≤ 2 s.e.): " + "; ".join(notes) + ".") if notes else \
        f"Every judge difference against the {names[0]} exceeds 2 s.e."


if __name__ == "__main__":
    main()
