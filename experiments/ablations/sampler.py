"""Ablation: the decoder's sampler — DDPM vs DDIM vs DPM-Solver++ (2M, 3M) against steps.

The diffusion prior's embeddings are drawn once; the decoder (guidance 3) then samples them
with each method at each step count. Respacing: DDPM and DDIM take evenly spaced steps (the
pipeline's default ``"N"``); the DPM-Solver++ rows use the log-SNR-uniform ``"logsnrN"``
spacing that :mod:`unclip_jax.core.diffusion.sampler` recommends for the multistep solvers. DDPM
uses the decoder's learned variance, DDIM η = 0 (deterministic). Wall time per image is taken
over the batches after the first (which pays the compile), on a shared, loaded CPU: compare
it between rows of one run only. Writes ``experiments/ablations/sampler.png``.

    python experiments/ablations/sampler.py [--steps 10 25 50 100] [--ddpm-extra 250]
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

BATCH = 16
PLOT = Path(__file__).resolve().parent / "sampler.png"
METHODS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m")


def spacing(method: str, steps: int) -> str:
    return f"logsnr{steps}" if method.startswith("dpmpp") else str(steps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--ddpm-extra", type=int, nargs="*", default=[250],
                   help="extra step counts for DDPM only (it needs many)")
    p.add_argument("--num-per-kind", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--decoder", default=None, help="decoder run (default: the demo's)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    chain, clip, prompts, scenes, ref = common.setup(args.num_per_kind, args.seeds,
                                                     args.decoder)
    drawn = common.prior_batches(chain, prompts, args.seeds, BATCH)
    mode = "image+caption" if chain.dec_cfg.use_text else "image"
    rows = {}
    for method in args.methods:
        counts = list(args.steps) + (list(args.ddpm_extra) if method == "ddpm" else [])
        for steps in counts:
            acc, times = common.RowMetrics(clip), []
            for k, (seed, b, sl, inp, emb) in enumerate(drawn):
                t0 = time.perf_counter()
                images = common.decode(chain, emb, inp["text_tokens"], 1000 * seed + b,
                                       scale=args.guidance, steps=spacing(method, steps),
                                       method=method, mode=mode)
                if k > 0:                                 # the first batch pays the compile
                    times.append((time.perf_counter() - t0) / len(images))
                acc.update(images, prompts[sl], ref.text_feats[sl], seed)
            r = dict(acc.result(ref.stats), method=method, steps=steps,
                     spacing=spacing(method, steps),
                     s_per_image=float(np.median(times)) if times else float("nan"))
            rows[f"{method}/{steps}"] = r
            print(method, steps, {k: v for k, v in r.items() if not isinstance(v, dict)},
                  flush=True)

    prov = common.provenance(chain)
    data = {"rows": rows, "fd_floor": ref.fd_floor, "clip_score_real": ref.clip_score_real,
            "decoder": str(chain.decoder_workdir), "mode": mode, "prompts": len(prompts),
            "seeds": args.seeds, **prov}
    common.save_json("sampler", data)
    by = {m: [r for r in rows.values() if r["method"] == m] for m in args.methods}
    series = lambda key: [(m, [r["steps"] for r in v], [r[key] for r in v])  # noqa: E731
                          for m, v in by.items()]
    common.plot_panels(PLOT, [
        dict(title="FD_CLIP vs steps (lower is better)", xlabel="decoder steps",
             ylabel="FD_CLIP", series=series("fd_clip"), log_x=True),
        dict(title="judge fidelity (1 object) vs steps", xlabel="decoder steps",
             ylabel="fidelity", series=series("fidelity"), log_x=True),
        dict(title="wall time per image vs steps (loaded CPU)", xlabel="decoder steps",
             ylabel="s / image", series=series("s_per_image"), log_x=True),
    ])
    body = render(data, args, rows, time.perf_counter() - t_start)
    print(body)
    if not args.no_write:
        common.write_group("sampler", body)
    return data


def render(data: dict, args, rows: dict, wall: float) -> str:
    n = data["prompts"]
    table = common.table(
        ["method", "steps (spacing)"] + common.METRIC_HEADER + ["s / image"],
        [[r["method"], f"{r['steps']} (`{r['spacing']}`)"] + common.row_cells(r)
         + [f"{r['s_per_image']:.3f}"] for r in rows.values()])
    dec = data["decoder"].replace(str(common.ROOT) + "/", "")
    best = min(rows.values(), key=lambda r: r["fd_clip"])
    close = [f"{r['method']}/{r['steps']}" for r in rows.values()
             if common.within_noise(r["fidelity"], r["fidelity_se"], best["fidelity"],
                                    best["fidelity_se"])]
    return "\n".join([
        "### Ablation: decoder sampler vs steps (DDPM / DDIM / DPM-Solver++)",
        "",
        f"`python experiments/ablations/sampler.py --steps {' '.join(map(str, args.steps))} "
        f"--ddpm-extra {' '.join(map(str, args.ddpm_extra))} --num-per-kind "
        f"{args.num_per_kind} --seeds {' '.join(map(str, args.seeds))}"
        f"{common.decoder_flag(args.decoder)}`. Decoder `{dec}` "
        f"({data['mode']} conditioning), guidance {args.guidance}; embeddings from the "
        f"diffusion prior `runs/demo/prior`, drawn once. {n} held-out prompts ({n // 2} "
        f"one-object, {n // 2} two-object) × {len(args.seeds)} seeds = {n * len(args.seeds)} "
        f"images per row, 32 px. DDPM: ancestral with the learned variance; DDIM: η 0; "
        f"DPM-Solver++: `logsnrN` spacing. Seconds per image: median over batches of "
        f"{BATCH} after the compiling one, on the loaded shared CPU (noisy; compare within "
        f"this table only). Plot: `experiments/ablations/sampler.png`.",
        "",
        table,
        "",
        f"FD_CLIP reference (renders of other held-out scenes vs the prompts' renders, "
        f"same count; a scale, not a bound): **{data['fd_floor']:.3f}**. "
        f"Lowest FD_CLIP: {best['method']} at {best['steps']} steps. Rows whose one-object "
        f"fidelity is within 2 s.e. of that row's: {', '.join(close)}.",
        "",
        common.provenance_line(data, wall),
    ])


if __name__ == "__main__":
    main()
