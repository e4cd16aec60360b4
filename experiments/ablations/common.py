"""Shared pieces of the ablation scripts: the chain, held-out prompts, streamed metrics, RESULTS.

Every ablation measures the same things the same way, so its rows are comparable with the
other ablations' rows:

* **prompts**: the demo's held-out prompt set (``unclip_jax.commands.demo.held_out_scenes``:
test-split
  scenes, every one containing a colour–shape pair never seen in training), the first
  ``n`` single-object and the first ``n`` two-object scenes of scene seed 7;
* **images** are judged at the decoder's own resolution (32 px, no upsampler): the ablations
  are about the prior, the decoder's guidance and the sampler, and the 32→64 upsampler would
  only add time and its own errors to every row;
* **metrics** (``unclip_jax.train.eval.metrics``, the demo CLIP as feature extractor): the judge's
  prompt fidelity / binding / relation fractions with their binomial standard errors, CLIP
  score (mean ± s.e.), FD_CLIP against renders of the prompts' own scenes (with the floor: FD
  between those renders and renders of other held-out scenes at the same count), and
  diversity (mean pairwise CLIP-feature distance). Features are streamed per batch; only the
  ``[N, 64]`` features are kept (for diversity), never the images.
* **seeds**: every configuration runs with ≥ 2 sampling seeds, metrics pooled over them (the
  per-seed FD is kept too, so seed noise is visible);
* **RESULTS.md**: :func:`write_group` replaces the block between ``<!-- ablation:NAME -->`` and
  ``<!-- /ablation:NAME -->`` (appending it the first time), leaving the rest untouched.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "runs" / "demo"
RUNS = ROOT / "runs" / "ablations"
RESULTS = ROOT / "experiments" / "RESULTS.md"
MACHINE = "2-core CPU, shared with other jobs"
PROMPT_SEED, REFERENCE_SEED = 7, 8
# Where decoder runs under runs/ablations came from (printed in the provenance line).
DECODER_ORIGINS = {
    "decoder_v": "the demo's ε decoder (1500 steps) fine-tuned 300 steps with v prediction, "
                 "the sampling-quality fix of commit f2cb0ca (a copy of that fix's run)",
}

# ============================================================================ prompts


def held_out(num_per_kind: int, seed: int = PROMPT_SEED) -> tuple[list[str], list]:
    """``num_per_kind`` single-object then ``num_per_kind`` two-object test-split scenes and
    their captions (the demo's prompt set, cut to size)."""
    from unclip_jax.core import shapes

    if num_per_kind < 1:
        raise ValueError(f"num_per_kind must be ≥ 1, got {num_per_kind}")
    scenes = [shapes.sample_scene(seed, i, "test", num_objects=k)
              for k in (1, 2) for i in range(num_per_kind)]
    return [shapes.caption(s) for s in scenes], scenes


def renders(scenes: Sequence, size: int) -> np.ndarray:
    from unclip_jax.core import shapes

    return np.stack([shapes.render(s, size) for s in scenes])


# ============================================================================ the chain


def trained(workdir: str | os.PathLike) -> bool:
    """Whether a training run finished: its config's last step has a complete checkpoint."""
    from unclip_jax.commands.demo import is_trained as _trained

    cfg = Path(workdir) / "config.json"
    if not cfg.is_file():
        return False
    return _trained(Path(workdir), int(json.loads(cfg.read_text())["train"]["steps"]))


@dataclasses.dataclass
class Chain:
    """The frozen demo models the ablations share: CLIP (with tokenizer), diffusion prior
    sampler, and one decoder (no upsampler)."""

    clip_cfg: object
    clip_params: dict
    tokenizer: object
    prior_workdir: Path
    dec_cfg: object
    dec_params: dict
    decoder_workdir: Path

    @property
    def size(self) -> int:
        return self.dec_cfg.image_size


def load_chain(workdir: str | os.PathLike = DEMO, decoder: str | os.PathLike | None = None
               ) -> Chain:
    """The CLIP, tokenizer and decoder of ``workdir`` (``decoder``: another decoder run)."""
    from unclip_jax.core.text import Tokenizer
    from unclip_jax.train import runs

    workdir = Path(workdir)
    dec_dir = Path(decoder) if decoder else workdir / "decoder"
    for p in (workdir / "clip", workdir / "prior", dec_dir, workdir / "tokenizer.model"):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing; the ablations need the trained demo "
                                    f"chain (`make demo`) in {workdir}")
    clip = runs.load_clip(workdir / "clip")
    clip_params, clip_cfg = clip.params, clip.config
    dec_params, dec_cfg = runs.load_decoder(dec_dir, None)
    if dec_cfg.clip_dim != clip_cfg.embed_dim:
        raise ValueError(f"decoder {dec_dir} reads {dec_cfg.clip_dim}-d embeddings, the CLIP "
                         f"makes {clip_cfg.embed_dim}-d ones")
    to_dev = functools.partial(jax.tree.map, jnp.asarray)
    return Chain(clip_cfg, to_dev(clip_params), Tokenizer.load(workdir / "tokenizer.model"),
                 workdir / "prior", dec_cfg, to_dev(dec_params), dec_dir)


@functools.lru_cache(maxsize=4)
def text_fn(clip_cfg):
    from unclip_jax.pipelines.unclip import encode_text

    return jax.jit(functools.partial(encode_text, clip_cfg))


def text_inputs(chain: Chain, prompts: Sequence[str]) -> dict:
    """The prior's inputs for ``prompts``: ``text_tokens [B, L]``, ``text_states [B, L, W]``
    and the unit-norm ``text_emb [B, E]`` of the CLIP text tower."""
    tokens = np.asarray(chain.tokenizer.encode(list(prompts), chain.clip_cfg.context_length),
                        np.int32)
    states, emb = text_fn(chain.clip_cfg)(chain.clip_params, tokens)
    return {"text_tokens": tokens, "text_states": np.asarray(states, np.float32),
            "text_emb": np.asarray(emb, np.float32)}


def prior_batches(chain: Chain, prompts: Sequence[str], seeds: Sequence[int], batch: int,
                  **prior_settings) -> list[tuple[int, int, slice, dict, np.ndarray]]:
    """``(seed, batch index, slice, text inputs, image embeddings)`` for every seed and batch:
    the diffusion prior's embeddings (``prior_settings`` override its sampling, e.g.
    ``num_candidates``), drawn once so every decoder setting of a sweep decodes the same ones.
    The prior's key is ``PRNGKey(1000·seed + b)``, the decoder's is the same number."""
    from unclip_jax.train import runs

    sampler = runs.load_prior(chain.prior_workdir, **prior_settings)
    out = []
    for seed in seeds:
        for b, sl in enumerate(batches(len(prompts), batch)):
            inp = text_inputs(chain, prompts[sl])
            emb = np.asarray(sampler(inp, jax.random.PRNGKey(1000 * seed + b)), np.float32)
            out.append((seed, b, sl, inp, emb))
    return out


DECODE_MODES = ("image", "image+caption", "caption")


@functools.lru_cache(maxsize=32)
def _decode_fn(dec_cfg, steps: int | str, method: str, mode: str):
    from unclip_jax.models import decoder as D
    from unclip_jax.pipelines import unclip

    schedule = unclip.decoder_schedule(dec_cfg, steps)

    def fn(params, emb, tokens, rng, scale, eta):
        if mode == "caption":             # the CLIP embedding replaced by the learned null
            emb = jnp.broadcast_to(D.null_cond(params, dec_cfg)["image_emb"], emb.shape)
        x = unclip.decode(dec_cfg, params, emb, rng, scale, schedule=schedule, method=method,
                          eta=eta, tokens=None if mode == "image" else tokens)
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return jax.jit(fn)


def decode(chain: Chain, emb, tokens, seed: int, *, scale: float = 3.0,
           steps: int | str = 50, method: str = "ddim", eta: float = 0.0,
           mode: str = "image") -> np.ndarray:
    """uint8 decoder images ``[B, S, S, 3]`` from image embeddings ``[B, E]``.

    ``mode``: "image" (embedding only; a caption decoder gets its null caption), "image+caption"
    (embedding and the caption ``tokens``), "caption" (the learned null embedding and the
    caption: GLIDE-style caption-only decoding). Guidance scale and η are traced (no
    recompile); steps, method and mode are static.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; accepted: {', '.join(DECODE_MODES)}")
    if mode != "image" and not chain.dec_cfg.use_text:
        raise ValueError(f"mode {mode!r} needs a decoder with a caption encoder "
                         f"(model.text_layers > 0); {chain.decoder_workdir} has none")
    from unclip_jax.models.decoder import fit_tokens

    tokens = fit_tokens(jnp.asarray(tokens, jnp.int32), chain.dec_cfg.context_length,
                        chain.dec_cfg.pad_id) if chain.dec_cfg.use_text else jnp.asarray(tokens)
    fn = _decode_fn(chain.dec_cfg, steps, method, mode)
    return np.asarray(fn(chain.dec_params, jnp.asarray(emb, jnp.float32), tokens,
                         jax.random.PRNGKey(seed), jnp.float32(scale), jnp.float32(eta)))


# ============================================================================ metrics


def binomial_se(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1 - p), 0.0) / max(n, 1)))


class RowMetrics:
    """Streams generated batches into the metrics of one table row (see module docstring)."""

    def __init__(self, clip):
        self.clip = clip
        self.feats: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.per_seed: dict[int, list[np.ndarray]] = {}
        self.judged = {"single": [0, 0], "two": [0, 0], "relation": [0, 0]}

    def update(self, images: np.ndarray, prompts: Sequence[str], text_feats: np.ndarray,
               seed: int) -> "RowMetrics":
        from unclip_jax.train.eval import metrics

        f = self.clip.images(images)
        self.feats.append(f)
        self.per_seed.setdefault(seed, []).append(f)
        self.scores.append(metrics.clip_scores(f, text_feats))
        j = metrics.judge_scores(images, prompts)
        for key, frac, n in (("single", j["single_colour_shape"], j["num_single"]),
                             ("two", j["two_both_colour_shape"], j["num_two"]),
                             ("relation", j["relation"], j["num_two"])):
            if n:
                self.judged[key][0] += int(round(frac * n))
                self.judged[key][1] += n
        return self

    def per_caption_diversity(self) -> float:
        """Mean CLIP-feature distance between two samples of the same caption (the same
        training run, two sampling seeds), over captions and seed pairs: the diversity of one
        prompt's samples, which the paper's Figs. 9–11 are about (``diversity`` pools every
        prompt, so different prompts dominate it). NaN with one seed."""
        groups: dict = {}
        for key, parts in self.per_seed.items():
            groups.setdefault(key[0] if isinstance(key, tuple) else 0, []).append(
                np.concatenate(parts))
        dists = [np.linalg.norm(a - b, axis=1) for fs in groups.values()
                 for i, a in enumerate(fs) for b in fs[i + 1:]]
        return float(np.mean(np.concatenate(dists))) if dists else float("nan")

    def result(self, real_stats) -> dict:
        from unclip_jax.train.eval import metrics

        feats = np.concatenate(self.feats)
        scores = np.concatenate(self.scores)
        out = {"n": int(len(feats)),
               "clip_score": float(scores.mean()),
               "clip_score_se": float(scores.std(ddof=1) / np.sqrt(len(scores))),
               "fd_clip": metrics.frechet_distance(real_stats, metrics.FeatureStats.of(feats)),
               "fd_clip_per_seed": {s: metrics.frechet_distance(
                   real_stats, metrics.FeatureStats.of(np.concatenate(v)))
                   for s, v in self.per_seed.items()},
               "diversity": metrics.mean_pairwise_distance(feats),
               "diversity_per_caption": self.per_caption_diversity()}
        for key, name in (("single", "fidelity"), ("two", "binding"),
                          ("relation", "relation")):
            k, n = self.judged[key]
            p = k / n if n else float("nan")
            out[name], out[name + "_se"], out[name + "_n"] = p, binomial_se(p, n), n
        return out


@dataclasses.dataclass
class Reference:
    """Real renders of the prompts' scenes (FD target, CLIP-score ceiling) and the FD floor."""

    stats: object
    fd_floor: float
    clip_score_real: float
    image_feats: np.ndarray      # [P, E] CLIP features of the prompts' own renders
    text_feats: np.ndarray       # [P, E] CLIP features of the prompts



def setup(num_per_kind: int, seeds, decoder=None):
    """What every ablation starts from: ``(chain, clip, prompts, scenes, ref)`` — the chain
    (with ``decoder`` in place of the demo's when given), its CLIP as the metrics' feature
    extractor, the held-out prompts and scenes, and the features of their renders repeated
    once per seed (the FD_CLIP reference)."""
    from unclip_jax.train.eval import metrics

    chain = load_chain(decoder=decoder)
    clip = metrics.ClipFeatures(chain.clip_cfg, chain.clip_params, chain.tokenizer)
    prompts, scenes = held_out(num_per_kind)
    ref = reference(clip, prompts, scenes, chain.size, repeats=len(seeds))
    return chain, clip, prompts, scenes, ref

def reference(clip, prompts: Sequence[str], scenes: Sequence, size: int,
              repeats: int = 1) -> Reference:
    """FD target = the prompts' own renders (repeated ``repeats`` times, one per seed, so the
    generated and real sets have the same count); floor = FD between those and renders of
    other held-out scenes (scene seed 8) at the same count."""
    from unclip_jax.train.eval import metrics

    n = len(scenes) // 2
    real = clip.images(renders(scenes, size))
    _, other = held_out(n, REFERENCE_SEED)
    ref = clip.images(renders(other, size))
    text = clip.texts(prompts)
    real_stats = metrics.FeatureStats.of(np.concatenate([real] * repeats))
    floor = metrics.frechet_distance(real_stats,
                                     metrics.FeatureStats.of(np.concatenate([ref] * repeats)))
    return Reference(real_stats, floor, float(metrics.clip_scores(real, text).mean()), real,
                     text)


def batches(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def timed(fn: Callable, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# ============================================================================ formatting


def pct(p: float, se: float | None = None) -> str:
    return f"{p:.3f}" if se is None else f"{p:.3f} ± {se:.3f}"


def row_cells(r: dict) -> list[str]:
    """The standard metric cells: fidelity, binding, relation, CLIP score, FD_CLIP (per-seed),
    diversity (all samples), diversity per caption."""
    seeds = ", ".join(f"{v:.3f}" for _, v in sorted(r["fd_clip_per_seed"].items()))
    return [pct(r["fidelity"], r["fidelity_se"]), pct(r["binding"], r["binding_se"]),
            pct(r["relation"], r["relation_se"]),
            f"{r['clip_score']:.1f} ± {r['clip_score_se']:.1f}",
            f"{r['fd_clip']:.3f} ({seeds})", f"{r['diversity']:.3f}",
            f"{r.get('diversity_per_caption', float('nan')):.3f}"]


METRIC_HEADER = ["fidelity (1 obj)", "binding (2 obj)", "relation", "CLIP score",
                 "FD_CLIP pooled (per seed)", "diversity", "diversity per caption"]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def within_noise(a: float, a_se: float, b: float, b_se: float, z: float = 2.0) -> bool:
    """Is ``|a − b|`` below ``z`` standard errors of the difference?"""
    return abs(a - b) <= z * float(np.hypot(a_se, b_se))


def provenance(chain: Chain | None = None) -> dict:
    """Commit, date, machine and load (and the decoder's output parametrisation and step),
    for the row group's provenance line."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "unclip_jax"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", ""
    out = {"decoder_note": ""}
    if chain is not None:
        cfg = json.loads((chain.decoder_workdir / "config.json").read_text())
        rel = str(chain.decoder_workdir).replace(str(ROOT) + "/", "")
        out["decoder_note"] = (f" Decoder `{rel}`: model_output={chain.dec_cfg.model_output}, "
                               f"{cfg['train']['steps']} steps × batch "
                               f"{cfg['train']['batch_size']}"
                               + (f", {DECODER_ORIGINS[chain.decoder_workdir.name]}"
                                  if chain.decoder_workdir.name in DECODER_ORIGINS else "")
                               + ".")
        if chain.dec_cfg.model_output == "eps" and chain.dec_cfg.schedule == "cosine":
            out["decoder_note"] += (
                " **Caveat:** this decoder predicts ε on the cosine schedule, which is "
                "ill-posed at the terminal step (`tests/test_sampler.py::"
                "test_eps_output_is_ill_posed_at_the_cosine_terminal_step`); its samples are "
                "covered in coloured noise, so these rows mostly measure that failure and "
                "their differences say little about the ablated component.")
    return {**out, "commit": commit + ("+uncommitted library edits" if dirty else ""),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{MACHINE} (load average {os.getloadavg()[0]:.1f} at the end)"}


def decoder_flag(decoder) -> str:
    """The ``--decoder`` part of a script's command line (empty for the default)."""
    if not decoder:
        return ""
    return " --decoder " + str(decoder).replace(str(ROOT) + "/", "")


def provenance_line(p: dict, wall_s: float) -> str:
    return (f"Measured {p['date']} with the code of commit `{p['commit']}` on a {p['machine']}; "
            f"wall time {wall_s / 60:.1f} min.{p.get('decoder_note', '')}")


# ============================================================================ RESULTS.md


def write_group(name: str, body: str, path: str | os.PathLike = RESULTS) -> Path:
    """Put ``body`` between ``<!-- ablation:NAME -->`` and ``<!-- /ablation:NAME -->`` in
    ``path``, replacing the previous group of that name or appending a new one."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"ablation name {name!r} must be lowercase letters, digits or _")
    path = Path(path)
    text = path.read_text() if path.exists() else "# Results\n"
    start, end = f"<!-- ablation:{name} -->", f"<!-- /ablation:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def save_json(name: str, data: dict) -> Path:
    RUNS.mkdir(parents=True, exist_ok=True)
    out = RUNS / f"{name}.json"
    out.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return out


# ============================================================================ plots (PIL only)

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
            (23, 190, 207)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** np.floor(np.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    return list(np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step))


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


_MARKERS = ("circle", "square", "triangle", "diamond")


def _marker(draw, kind: str, a: float, b: float, colour, r: float = 3.5) -> None:
    if kind == "circle":
        draw.ellipse([a - r, b - r, a + r, b + r], fill=colour)
    elif kind == "square":
        draw.rectangle([a - r, b - r, a + r, b + r], fill=colour)
    elif kind == "triangle":
        draw.polygon([(a, b - r - 1), (a - r - 1, b + r), (a + r + 1, b + r)], fill=colour)
    else:
        draw.polygon([(a, b - r - 1), (a + r + 1, b), (a, b + r + 1), (a - r - 1, b)],
                     fill=colour)


def plot_panels(path: str | os.PathLike, panels: Sequence[dict], width: int = 460,
                height: int = 340, legend: str = "panel") -> Path:
    """Line plots side by side, drawn with PIL (no plotting library in the environment).

    Each panel: ``title``, ``xlabel``, ``ylabel``, ``series`` = list of ``(label, xs, ys)``,
    optional ``log_x`` and ``annotate`` (list of per-point strings for the first series).
    ``legend="panel"`` names the series inside each panel; ``"below"`` draws one legend for all
    panels under them, in columns, and gives a label the same colour and marker in every panel
    (for many series: colours cycle, and each cycle takes the next marker shape).
    """
    from PIL import Image, ImageDraw

    if legend not in ("panel", "below"):
        raise ValueError(f"legend must be 'panel' or 'below', got {legend!r}")
    labels = list(dict.fromkeys(lab for p in panels for lab, _, _ in p["series"]))
    style = {lab: (_COLOURS[i % len(_COLOURS)], _MARKERS[(i // len(_COLOURS)) % len(_MARKERS)])
             for i, lab in enumerate(labels)}
    col_w, row_h = 230, 14
    ncols = max(1, width * len(panels) // col_w)
    legend_h = 0 if legend == "panel" else 10 + row_h * -(-len(labels) // ncols)
    img = Image.new("RGB", (width * len(panels), height + legend_h), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 62, 16, 28, 46
    for k, panel in enumerate(panels):
        x0 = k * width
        series = []
        for lab, xs, ys in panel["series"]:
            xs, ys = np.asarray(xs, float), np.asarray(ys, float)
            keep = np.isfinite(xs) & np.isfinite(ys)
            if keep.any():
                series.append((lab, xs[keep], ys[keep]))
        if not series:
            continue
        log_x = panel.get("log_x", False)
        tx = (lambda v: np.log10(v)) if log_x else (lambda v: v)
        allx = np.concatenate([tx(s[1]) for s in series])
        ally = np.concatenate([s[2] for s in series])
        ylo, yhi = float(ally.min()), float(ally.max())
        pad = 0.08 * (yhi - ylo or abs(yhi) or 1.0)
        ylo, yhi = ylo - pad, yhi + pad
        xlo, xhi = float(allx.min()), float(allx.max())
        xpad = 0.05 * (xhi - xlo or 1.0)
        xlo, xhi = xlo - xpad, xhi + xpad
        px = lambda v: x0 + left + (tx(v) - xlo) / (xhi - xlo) * (width - left - right)  # noqa
        py = lambda v: top + (yhi - v) / (yhi - ylo) * (height - top - bottom)  # noqa
        draw.rectangle([x0 + left, top, x0 + width - right, height - bottom], outline="black")
        for t in _ticks(ylo, yhi):
            y = py(t)
            draw.line([x0 + left - 4, y, x0 + left, y], fill="black")
            draw.text((x0 + 4, y - 6), _fmt(t), fill="black")
        xt = sorted({float(v) for s in series for v in s[1]}) if log_x else \
            _ticks(xlo, xhi)
        for t in xt:
            x = px(t)
            draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
            draw.text((x - 8, height - bottom + 6), _fmt(t), fill="black")
        draw.text((x0 + left, 8), panel["title"], fill="black")
        draw.text((x0 + left + 120, height - 18), panel["xlabel"]
                  + (" (log scale)" if log_x else ""), fill="black")
        draw.text((x0 + left + 4, top + 4), panel["ylabel"], fill=(90, 90, 90))
        for j, (label, xs, ys) in enumerate(series):
            colour, marker = style[label]
            pts = [(px(a), py(b)) for a, b in zip(xs, ys)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for a, b in pts:
                _marker(draw, marker, a, b, colour)
            if j == 0 and panel.get("annotate"):
                for (a, b), text in zip(pts, panel["annotate"]):
                    draw.text((a + 5, b - 12), text, fill=colour)
            if legend == "panel" and len(series) > 1:
                ly = top + 18 + 13 * j
                draw.line([x0 + width - right - 110, ly + 6, x0 + width - right - 94, ly + 6],
                          fill=colour, width=2)
                draw.text((x0 + width - right - 90, ly), label, fill=colour)
    if legend == "below":
        for i, label in enumerate(labels):
            colour, marker = style[label]
            lx, ly = 12 + col_w * (i % ncols), height + 4 + row_h * (i // ncols)
            draw.line([lx, ly + 6, lx + 18, ly + 6], fill=colour, width=2)
            _marker(draw, marker, lx + 9, ly + 6, colour)
            draw.text((lx + 24, ly), label, fill=colour)
    path = Path(path)
    img.save(path)
    return path
