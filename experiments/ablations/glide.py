"""Ablation: the unCLIP decoder against a GLIDE-style caption-only decoder at equal training
compute (unCLIP §5.2 Figs. 9–11 and §7).

The paper compares unCLIP (prior → CLIP image embedding → decoder) with GLIDE (a decoder that
reads only the caption) and reports two things: as guidance rises, GLIDE's samples collapse
onto few modes while unCLIP keeps its diversity (Figs. 9–11: diversity / FID against guidance),
and unCLIP binds attributes to objects worse than GLIDE (§7, Fig. 14). Here both decoders are
the same U-Net trained with the same recipe, steps and batch (so the same CPU cost); they
differ only in conditioning:

* unCLIP (``experiments/shapes/decoder.py``'s recipe): the CLIP image embedding (dropped 10 %)
  and the caption (dropped 50 %); sampled from the diffusion prior's embedding (``runs/demo/
  prior``, drawn once and shared by every scale) and the caption;
* GLIDE: ``model.clip_drop_prob=1`` (the embedding is always the learned null) and
  ``model.text_drop_prob=0.2`` (GLIDE's caption drop rate); sampled from the caption alone.

Each decoder family is given as one or more training runs (seeds); every run is sampled with
every sampling seed and the metrics are pooled. Guidance sweeps the decoder's scale; judged at
32 px (no upsampler), metrics as the other ablations (``common.py``). Writes the row group
``glide`` and ``experiments/ablations/glide.png``.

    python experiments/ablations/glide.py --unclip runs/curve/A_s0 runs/curve/A_s1 \\
        --glide runs/curve/G_s0 runs/curve/G_s1 [--scales 1 2 3 4 6 8] [--num-per-kind 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 32
PLOT = Path(__file__).resolve().parent / "glide.png"
FAMILIES = {"unCLIP": "image+caption", "GLIDE": "caption"}


def with_decoder(chain: common.Chain, workdir: str) -> common.Chain:
    from unclip_jax.train import runs

    params, cfg = runs.load_decoder(workdir, None)
    return dataclasses.replace(chain, dec_cfg=cfg, dec_params=jax.tree.map(jnp.asarray, params),
                               decoder_workdir=Path(workdir))


def run_description(workdir: str) -> str:
    cfg = json.loads((Path(workdir) / "config.json").read_text())
    m = cfg["model"]
    return (f"`{workdir}`: {cfg['train']['steps']} steps × batch {cfg['train']['batch_size']}, "
            f"seed {cfg['train']['seed']}, drops (embedding {m['clip_drop_prob']}, caption "
            f"{m['text_drop_prob']})")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unclip", nargs="+", required=True, help="unCLIP decoder runs (seeds)")
    p.add_argument("--glide", nargs="+", required=True, help="caption-only decoder runs")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    p.add_argument("--num-per-kind", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", default="50",
                   help="decoder steps (spaced by its config) or a respace spec, e.g. logsnr20")
    p.add_argument("--method", default="ddim", help="sampler, e.g. ddim, dpmpp_3m")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    runs = {"unCLIP": args.unclip, "GLIDE": args.glide}
    chain, clip, prompts, scenes, ref = common.setup(
        args.num_per_kind, [(r, s) for r in range(max(map(len, runs.values())))
                            for s in args.seeds], args.unclip[0])
    drawn = common.prior_batches(chain, prompts, args.seeds, BATCH)
    rows: dict[tuple[str, float], dict] = {}
    for family, mode in FAMILIES.items():
        chains = [with_decoder(chain, w) for w in runs[family]]
        for c in chains:
            if not c.dec_cfg.use_text:
                raise ValueError(f"{c.decoder_workdir} has no caption encoder; both families "
                                 f"need one (model.text_layers > 0)")
        for scale in args.scales:
            acc, t0 = common.RowMetrics(clip), time.perf_counter()
            for r, c in enumerate(chains):
                for seed, b, sl, inp, emb in drawn:
                    images = common.decode(c, emb, inp["text_tokens"], 1000 * seed + b,
                                           scale=scale, steps=args.steps, method=args.method,
                                           mode=mode)
                    acc.update(images, prompts[sl], ref.text_feats[sl], (r, seed))
            rows[family, scale] = dict(acc.result(ref.stats), seconds=time.perf_counter() - t0)
            print(family, scale, {k: v for k, v in rows[family, scale].items()
                                  if not isinstance(v, dict)}, flush=True)

    prov = common.provenance(chain)
    data = {"rows": {f"{f} {s:g}": v for (f, s), v in rows.items()}, "fd_floor": ref.fd_floor,
            "clip_score_real": ref.clip_score_real, "runs": runs, "prompts": len(prompts),
            "seeds": args.seeds, **prov}
    data["rows"] = {k: {**v, "fd_clip_per_seed": {str(s): x for s, x in
                                                   v["fd_clip_per_seed"].items()}}
                    for k, v in data["rows"].items()}
    common.save_json("glide", data)
    panels = []
    for key, title in (("fidelity", "fidelity (1 obj)"), ("binding", "binding (2 obj)"),
                       ("relation", "relation"),
                       ("diversity_per_caption", "diversity per caption (CLIP features)"),
                       ("fd_clip", "FD_CLIP")):
        panels.append({"title": title, "xlabel": "decoder guidance", "ylabel": key,
                       "series": [(f, args.scales, [rows[f, s][key] for s in args.scales])
                                  for f in FAMILIES]})
    common.plot_panels(PLOT, panels, width=380)
    body = render(data, args, rows, time.perf_counter() - t_start)
    print(body)
    if not args.no_write:
        common.write_group("glide", body)
    return data


def render(data: dict, args, rows: dict, wall: float) -> str:
    table = common.table(
        ["decoder", "guidance"] + common.METRIC_HEADER,
        [[f, f"{s:g}"] + common.row_cells(r) for (f, s), r in rows.items()])
    n, k = data["prompts"], len(args.seeds)
    lines = [
        "### Ablation: unCLIP decoder vs GLIDE-style caption-only decoder (unCLIP Figs. 9–11, "
        "§7)", "",
        f"`python experiments/ablations/glide.py --unclip {' '.join(args.unclip)} --glide "
        f"{' '.join(args.glide)} --scales {' '.join(f'{s:g}' for s in args.scales)} "
        f"--num-per-kind {args.num_per_kind} --seeds {' '.join(map(str, args.seeds))} "
        f"--method {args.method} --steps {args.steps}`. "
        f"{n} held-out prompts ({n // 2} one-object, {n // 2} two-object) × {k} sampling "
        f"seeds × each training run, judged at 32 px (no upsampler); {args.method} "
        f"{args.steps} steps, η 0. unCLIP rows decode the diffusion prior's embedding "
        f"(`runs/demo/prior`) with the caption; GLIDE rows the learned null embedding with "
        f"the caption. Plot: `experiments/ablations/glide.png`.", "",
        "Runs: " + "; ".join(run_description(w) for f in ("unCLIP", "GLIDE")
                             for w in data["runs"][f]) + ".", "",
        table, "",
        f"Fractions ± binomial s.e.; CLIP score ± s.e.; FD_CLIP against the prompts' own "
        f"renders, per (run, seed) in brackets; reference (other held-out scenes' renders): "
        f"**{data['fd_floor']:.3f}**.", "",
        common.provenance_line(data, wall),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
