"""Ablation: DALL·E 1 (first sample vs CLIP-reranked) against unCLIP on the same data.

DALL·E: the shapes dVAE (``experiments/shapes/dvae.py``) and transformer
(``experiments/shapes/dalle.py``, ``model.dvae_workdir`` pointed at it), trained into
``runs/ablations/dvae`` and ``runs/ablations/dalle``; ``N`` candidates per caption reranked by
the demo CLIP (the first drawn = no reranking). unCLIP: the demo chain's diffusion prior and
decoder (DDIM 50 steps, guidance 3) at the same 32 px. Same held-out prompts, seeds and
metrics as the other ablations. When the DALL·E runs are missing the row group says so.

    unclip-jax train experiments/shapes/dvae.py --workdir runs/ablations/dvae
    unclip-jax train experiments/shapes/dalle.py --workdir runs/ablations/dalle \\
        --set model.dvae_workdir=runs/ablations/dvae
    python experiments/ablations/dalle.py [--candidates 8] [--num-per-kind 16]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jax
import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from unclip_jax.core.images import to_uint8  # noqa: E402

BATCH = 16
# The demo chain's stage wall times as measured by `make demo` (RESULTS.md, "Demo chain"),
# used when runs/demo keeps no times file.
DEMO_SECONDS = {"clip": 845.0, "prior": 207.0, "decoder": 1939.0}


def budget(workdir: Path) -> dict:
    """Steps × batch from the run's config, and wall minutes from its tqdm log when kept
    (``runs/ablations/NAME.log``) or the demo's stage times."""
    cfg = json.loads((workdir / "config.json").read_text())["train"]
    out = {"steps": cfg["steps"], "batch": cfg["batch_size"], "minutes": None}
    log = workdir.parent / f"{workdir.name}.log"
    if log.is_file():
        m = re.findall(r"\[(\d+):(\d+)(?::(\d+))?<", log.read_text(errors="ignore"))
        if m:
            a, b, c = m[-1]
            secs = int(a) * 60 + int(b) if not c else int(a) * 3600 + int(b) * 60 + int(c)
            out["minutes"] = secs / 60
    else:
        from unclip_jax.commands.demo import read_times

        t = read_times(workdir.parent).get(workdir.name, DEMO_SECONDS.get(workdir.name))
        out["minutes"] = None if t is None else t / 60
    return out


def fmt_budget(name: str, b: dict) -> str:
    mins = "wall time not logged" if b["minutes"] is None else f"{b['minutes']:.0f} min"
    return f"{name} {b['steps']} × {b['batch']} ({mins})"


def dvae_eval(workdir: Path) -> dict | None:
    """The last evaluation record of a dVAE run (None when it has not finished)."""
    if not common.trained(workdir):
        return None
    records = [json.loads(line) for line in
               (workdir / "metrics.jsonl").read_text().splitlines() if "eval/psnr" in line]
    if not records:
        return None
    cfg = json.loads((workdir / "config.json").read_text())["train"]
    return dict(records[-1], steps=cfg["steps"], batch=cfg["batch_size"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dalle", default=str(common.RUNS / "dalle"))
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--guidance", type=float, default=1.5,
                   help="DALL·E classifier-free guidance (1.5: chosen for the shapes DALL·E)")
    p.add_argument("--num-per-kind", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--decoder", default=None, help="unCLIP decoder run (default: the demo's)")
    p.add_argument("--missing-reason", default="the dVAE + transformer did not fit in this "
                   "session's CPU budget after the other ablations",
                   help="why the DALL·E rows are missing (printed when they are)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    chain, clip, prompts, scenes, ref = common.setup(args.num_per_kind, args.seeds,
                                                     args.decoder)
    dalle_dir = Path(args.dalle)
    rows, budgets = {}, {}
    for name in ("clip", "prior", "decoder"):
        budgets[f"unCLIP {name}"] = budget(common.DEMO / name)

    have = common.trained(dalle_dir)
    if have:
        from unclip_jax.pipelines import dalle as dalle_pipe

        pipe, params = dalle_pipe.load_pipeline(dalle_dir, common.DEMO / "clip")
        dvae_dir = Path(pipe.cfg.dvae_workdir)
        budgets["dVAE"] = budget(dvae_dir if dvae_dir.is_absolute()
                                 else common.ROOT / dvae_dir)
        budgets["DALL·E transformer"] = budget(dalle_dir)
        first, best = common.RowMetrics(clip), common.RowMetrics(clip)
        for seed in args.seeds:
            for b, sl in enumerate(common.batches(len(prompts), BATCH)):
                out = pipe.generate_reranked(params["dalle"], params["dvae"], params["clip"],
                                             prompts[sl], jax.random.PRNGKey(1000 * seed + b),
                                             num_candidates=args.candidates,
                                             guidance_scale=args.guidance)
                px = to_uint8(out.images)
                k0 = np.argmax(np.asarray(out.order) == 0, axis=1)
                first.update(px[np.arange(len(px)), k0], prompts[sl], ref.text_feats[sl], seed)
                best.update(px[:, 0], prompts[sl], ref.text_feats[sl], seed)
        rows[f"DALL·E (guidance {args.guidance:g}), first sample"] = first.result(ref.stats)
        rows[f"DALL·E (guidance {args.guidance:g}), CLIP-best of {args.candidates}"] = \
            best.result(ref.stats)
    acc = common.RowMetrics(clip)
    mode = "image+caption" if chain.dec_cfg.use_text else "image"
    for seed, b, sl, inp, emb in common.prior_batches(chain, prompts, args.seeds, BATCH):
        images = common.decode(chain, emb, inp["text_tokens"], 1000 * seed + b, scale=3.0,
                               steps=50, mode=mode)
        acc.update(images, prompts[sl], ref.text_feats[sl], seed)
    rows["unCLIP (diffusion prior k=2, decoder DDIM 50, guidance 3)"] = acc.result(ref.stats)
    for name, r in rows.items():
        print(name, {k: v for k, v in r.items() if not isinstance(v, dict)}, flush=True)

    prov = common.provenance(chain)
    data = {"rows": rows, "budgets": budgets, "fd_floor": ref.fd_floor, "have_dalle": have,
            "prompts": len(prompts), "seeds": args.seeds, **prov}
    common.save_json("dalle", data)
    body = render(data, args, time.perf_counter() - t_start)
    print(body)
    if not args.no_write:
        common.write_group("dalle", body)
    return data


def render(data: dict, args, wall: float) -> str:
    n, rows, b = data["prompts"], data["rows"], data["budgets"]
    unclip_budget = ", ".join(fmt_budget(k.split()[1], v) for k, v in b.items()
                              if k.startswith("unCLIP"))
    lines = [
        "### Ablation: DALL·E 1 vs unCLIP on captioned shapes",
        "",
        f"`python experiments/ablations/dalle.py --candidates {args.candidates} "
        f"--num-per-kind {args.num_per_kind} --seeds {' '.join(map(str, args.seeds))}"
        f"{common.decoder_flag(args.decoder)}"
        f"{'' if Path(args.dalle) == common.RUNS / 'dalle' else ' --dalle ' + args.dalle}`. "
        f"{n} held-out prompts ({n // 2} one-object, {n // 2} two-object) × "
        f"{len(args.seeds)} seeds = {n * len(args.seeds)} images per row, all at 32 px. "
        f"Training budgets (steps × batch, wall minutes on the loaded 2-core CPU): unCLIP "
        f"{unclip_budget} (the upsampler is not used here)"
        + (f"; DALL·E {fmt_budget('dVAE', b['dVAE'])}, "
           f"{fmt_budget('transformer', b['DALL·E transformer'])}, reranked by the same "
           f"demo CLIP." if data["have_dalle"] else "."),
        "",
        common.table(["model"] + common.METRIC_HEADER,
                     [[k] + common.row_cells(r) for k, r in rows.items()]),
        "",
        f"FD_CLIP reference (renders of other held-out scenes vs the prompts' renders; a "
        f"scale, not a bound): **{data['fd_floor']:.3f}**.",
    ]
    if not data["have_dalle"]:
        lines += ["", f"DALL·E rows: **not measured** — no finished DALL·E run in "
                  f"`runs/ablations/dalle` ({args.missing_reason})."]
        dvae = dvae_eval(common.RUNS / "dvae")
        if dvae:
            lines += ["", f"The dVAE of `runs/ablations/dvae` (`experiments/shapes/dvae.py`, "
                      f"{dvae['steps']} steps × batch {dvae['batch']}) was trained: validation "
                      f"PSNR {dvae['eval/psnr']:.1f} dB with argmax codes, code perplexity "
                      f"{dvae['eval/code_perplexity']:.1f}, {100 * dvae['eval/used_fraction']:.1f}"
                      f" % of the codes used — the known collapse, so a transformer over "
                      f"these codes could at best place blobs of background-like codes."]
    else:
        dvae_dir = json.loads((Path(args.dalle) / "config.json").read_text())["model"].get(
            "dvae_workdir", "")
        dvae = dvae_eval(common.ROOT / dvae_dir) if dvae_dir else None
        if dvae:
            lines += ["", f"The transformer's dVAE (`{dvae_dir}`, {dvae['steps']} steps × batch "
                      f"{dvae['batch']}): validation PSNR {dvae['eval/psnr']:.1f} dB with "
                      f"argmax codes, code perplexity {dvae['eval/code_perplexity']:.1f}, "
                      f"{100 * dvae['eval/used_fraction']:.1f} % of the codes used; its "
                      f"reconstructions bound what the DALL·E rows can reach (see RESULTS' "
                      f"DALL·E section for the judged ceiling)."]
    lines += ["", common.provenance_line(data, wall)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
