"""Parameter counts of the paper-scale configs (``experiments/paper``) next to the papers' own.

Counted with ``unclip_jax.pipelines.describe`` (``jax.eval_shape`` of each model's init; nothing is
allocated), so the section takes seconds on any machine.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# config file → (paper's figure, source)
PAPER = {
    "clip_vit_l14": (427.6e6, "open_clip model profile of OpenAI ViT-L/14 (the CLIP paper "
                              "gives no count)"),
    "clip_vit_h16": (986.1e6, "open_clip ViT-H-14 (same towers at 224 px; unCLIP gives no "
                              "count)"),
    "prior": (1.0e9, "unCLIP Table 3, diffusion prior \"1B\""),
    "prior_ar": (1.0e9, "unCLIP Table 3, AR prior \"1B\""),
    "decoder": (3.5e9, "unCLIP Table 3 / GLIDE §4, 64×64 decoder 3.5B"),
    "upsampler_256": (700e6, "unCLIP Table 3, 64→256 upsampler 700M"),
    "upsampler_1024": (300e6, "unCLIP Table 3, 256→1024 upsampler 300M"),
    "dalle": (12e9, "DALL·E paper, 12B"),
    "dvae": (None, "DALL·E paper gives no count"),
}


def _fmt(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def run() -> str:
    from unclip_jax.core import config as config_lib
    from unclip_jax.pipelines.describe import describe

    lines = [
        "## Parameter counts of the paper-scale configs",
        "",
        "Ours: `unclip_jax.pipelines.describe` on `experiments/paper/<config>.py` "
        "(eval_shape of the "
        "model's init, exact). Paper: the published figure and where it comes from. Each "
        "config's docstring states its architecture sources and assumptions.",
        "",
        "| config | ours | paper | ours / paper | source |",
        "|---|---|---|---|---|",
    ]
    for stem, (paper, source) in PAPER.items():
        cfg = config_lib.load_config(ROOT / "experiments" / "paper" / f"{stem}.py")
        ours = describe(cfg, (1, 1, 1))["params"]
        ratio = f"{ours / paper:.3f}" if paper else "—"
        lines.append(f"| {stem} | {_fmt(ours)} | {_fmt(paper) if paper else '—'} | {ratio} "
                     f"| {source} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run())
