"""The unCLIP chain's quality against decoder training compute (issue 20's curve).

Every point is one decoder trained from scratch with a recipe (``RECIPES``: overrides of
``experiments/shapes/decoder.py`` on top of ``BASE``, the recipe before the study — the
config has since adopted the chosen one) for a number of steps, put into the chain of a fixed
``make demo`` workdir (its CLIP, prior and upsampler) and judged with the demo's procedure
(``demo.judge_chain``: held-out test-split prompts, half one-object, half two-object, judged at
64 px after the upsampler; variation consistency of held-out single-object renders).
Cost (x) = steps × the recipe's seconds per step measured on a quiet machine
(``benchmarks/bench_decoder_recipes.py --out``), so runs made while other jobs shared the cores
still land at the right x.

    python experiments/shapes/decoder_curve.py train patch2 --steps 4000 --seed 0
    python experiments/shapes/decoder_curve.py judge runs/curve/patch2_s0_4000 \
        --decoder-sampler dpmpp_3m:logsnr:20 --upsampler-sampler dpmpp_3m:logsnr:10
    python experiments/shapes/decoder_curve.py report --costs runs/curve/step_costs.json

``train`` writes ``runs/curve/<recipe>_s<seed>_<steps>/`` (resumable); ``judge`` appends one
row to ``runs/curve/rows.jsonl``; ``report`` prints the markdown table of the rows judged with
``CURVE_SETTINGS`` and draws ``experiments/shapes/decoder_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CURVE = Path("runs/curve")
PNG = ROOT / "experiments/shapes/decoder_curve.png"
METRICS = ("single_colour_shape", "two_both_colour_shape", "relation", "variation_consistency")

# the decoder recipe before this study (session 8's `make demo`): experiments/shapes/decoder.py
# has since adopted the chosen recipe, so every curve run starts from these overrides and its
# recipe's are applied on top (the "baseline" stays today's-recipe-as-it-was)
BASE = ["model.patch_size=1", "model.timestep_sampling=uniform", "model.timestep_loc=0.0",
        "model.timestep_scale=1.0", "model.text_class_emb=false", "model.embeddings_dir=",
        "model.sample_method=ddim", "model.sample_spacing=even", "model.sample_steps=50",
        "model.guidance_scale=3.0", "train.batch_size=32", "optim.learning_rate=1e-3",
        "model.text_drop_prob=0.5", "model.min_snr_gamma=5.0", "optim.optimizer=adamw"]
# name -> overrides of experiments/shapes/decoder.py ({emb}: the demo's embedding cache)
_P2 = ["model.embeddings_dir={emb}", "model.patch_size=2"]
_LN = _P2 + ["model.timestep_sampling=logit_normal"]
# the demo's AdamW recipe as overrides of BASE (experiments/shapes/decoder.py until Muon; the
# demo's recipe since is this + Muon, "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon", and from
# 2026-12-07 19:40 that with logit-normal scale 1.5, "..._muon_ls15")
_DEMO = _LN + ["model.text_class_emb=true", "train.batch_size=64", "optim.learning_rate=3e-3",
               "model.text_drop_prob=0.2", "model.min_snr_gamma=2"]
_MUON = ["optim.optimizer=muon", "optim.muon_adamw_modules=conv_in,conv_out"]
# the demo's recipe from 2026-12-07 19:40: the Muon recipe with logit-normal scale 1.5
_LS15 = _DEMO + _MUON + ["model.timestep_scale=1.5"]
# the decoder at 64 px on the r64 renders, patched 4×4, reading their own embedding cache
_R64 = ["data.name=captioned_shapes/r64", "data.image_size=64", "model.patch_size=4",
        "model.embeddings_dir={emb}_r64"]
RECIPES = {
    "baseline": [],
    "cached_emb": ["model.embeddings_dir={emb}"],
    "patch2": _P2,
    "patch2_w64": _P2 + ["model.base_channels=64"],
    "patch2_w48_mult124": _P2 + ["model.base_channels=48", "model.channel_mult=1,2,4"],
    "patch2_logitnorm": _LN,
    "patch2_cls": _P2 + ["model.text_class_emb=true"],
    "patch2_lr2e3": _P2 + ["optim.learning_rate=2e-3"],
    "patch2_attn16": _P2 + ["model.attention_resolutions=16,8"],
    "patch2_edm": _P2 + ["model.timestep_sampling=log_sigma_normal", "model.timestep_loc=-1.2",
                         "model.timestep_scale=1.2"],
    "p2ln_cls": _LN + ["model.text_class_emb=true"],
    "p2ln_lr2e3": _LN + ["optim.learning_rate=2e-3"],
    "p2ln_attn16": _LN + ["model.attention_resolutions=16,8"],
    "p2ln_tdrop02": _LN + ["model.text_drop_prob=0.2"],
    "p2ln_loc05": _P2 + ["model.timestep_sampling=logit_normal", "model.timestep_loc=0.5"],
    "p2ln_nosnr": _LN + ["model.min_snr_gamma=0"],
    "p2ln_loc10": _P2 + ["model.timestep_sampling=logit_normal", "model.timestep_loc=1.0"],
    "p2ln_b64": _LN + ["train.batch_size=64"],
    "p2ln_b128": _LN + ["train.batch_size=128"],
    "patch2_b64": _P2 + ["train.batch_size=64"],
    "patch2_b128": _P2 + ["train.batch_size=128"],
    "p2ln05_cls": _P2 + ["model.timestep_sampling=logit_normal", "model.timestep_loc=0.5",
                         "model.text_class_emb=true"],
    # conditioning and batch at the chosen recipe's cost (session 9): cross-attention to the
    # caption/CLIP context also at 16 px (the patched first level), and batch 64 (cheaper/image)
    "p2ln_cls_attn16": _LN + ["model.text_class_emb=true", "model.attention_resolutions=16,8"],
    "p2ln_cls_b64": _LN + ["model.text_class_emb=true", "train.batch_size=64"],
    "p2ln_cls_b64_lr2e3": _LN + ["model.text_class_emb=true", "train.batch_size=64",
                                "optim.learning_rate=2e-3"],
    "p2ln_cls_lr2e3": _LN + ["model.text_class_emb=true", "optim.learning_rate=2e-3"],
    "p2ln_cls_b64_lr3e3": _LN + ["model.text_class_emb=true", "train.batch_size=64",
                                "optim.learning_rate=3e-3"],
    # the demo's recipe with the caption dropped 20 % instead of 50 % (binding reads the caption)
    "p2ln_cls_b64_lr3e3_tdrop02": _LN + ["model.text_class_emb=true", "train.batch_size=64",
                                        "optim.learning_rate=3e-3", "model.text_drop_prob=0.2"],
    # the next demo's recipe (caption drop 20 %) at a higher rate, and at batch 128
    "p2ln_cls_b64_lr5e3_tdrop02": _LN + ["model.text_class_emb=true", "train.batch_size=64",
                                        "optim.learning_rate=5e-3", "model.text_drop_prob=0.2"],
    "p2ln_cls_b128_lr5e3_tdrop02": _LN + ["model.text_class_emb=true", "train.batch_size=128",
                                         "optim.learning_rate=5e-3",
                                         "model.text_drop_prob=0.2"],
    # ... and without the learned variance (the demo's 3M and DDIM samplers never read it;
    # the hybrid loss's VLB term takes part of every step's gradient)
    "p2ln_cls_b64_lr3e3_tdrop02_nolv": _LN + ["model.text_class_emb=true",
                                             "train.batch_size=64", "optim.learning_rate=3e-3",
                                             "model.text_drop_prob=0.2",
                                             "model.learned_variance=false"],
    # ... and without Min-SNR weighting (it gives the low-noise steps, where small shapes'
    # edges are drawn, γ/(SNR+1) of the v-loss's weight)
    "p2ln_cls_b64_lr3e3_tdrop02_nosnr": _LN + ["model.text_class_emb=true",
                                              "train.batch_size=64",
                                              "optim.learning_rate=3e-3",
                                              "model.text_drop_prob=0.2",
                                              "model.min_snr_gamma=0"],
    # ... and with Min-SNR's γ = 2 instead of 5 (removing it cost 0.29 single at 652 s)
    "p2ln_cls_b64_lr3e3_tdrop02_snr2": _DEMO,
    # ... and γ = 3 (between the paper's 5 and the demo's 2)
    "p2ln_cls_b64_lr3e3_tdrop02_snr3": _DEMO + ["model.min_snr_gamma=3"],
    # ... and γ = 1 (the weight peaks at SNR 1, where γ = 2 gained over 5)
    "p2ln_cls_b64_lr3e3_tdrop02_snr1": _DEMO + ["model.min_snr_gamma=1"],
    # capacity where the patched feature map is largest: a second residual block at 16 px
    # (the up path gets a third), the other levels unchanged
    "patch2_b64_res211": _P2 + ["train.batch_size=64", "model.num_res_blocks=2,1,1"],
    "patch2_b64_res2": _P2 + ["train.batch_size=64", "model.num_res_blocks=2"],
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_res211": _DEMO + ["model.num_res_blocks=2,1,1"],
    # the demo's recipe at batch 32 (lr 2e-3, about √2 below batch 64's 3e-3): at 652 s it
    # takes 5433 updates instead of 3135 (hypothesis: the budget is update-limited, as batch
    # 128 losing suggested)
    "p2ln_cls_lr2e3_tdrop02_snr2": _DEMO + ["train.batch_size=32", "optim.learning_rate=2e-3"],
    # a full-resolution first level (16 channels at 32 px, no patching) in front of the
    # patched recipe's U-Net (32 / 64 / 64 channels at 16 / 8 / 4 px): small crosses are lost
    # at low noise, where 2 px detail is drawn (hypothesis: a full-res path keeps it)
    "p1_w16_m1244_b64": ["model.embeddings_dir={emb}", "model.patch_size=1",
                         "model.base_channels=16", "model.channel_mult=1,2,4,4",
                         "train.batch_size=64"],
    "p1_w16_m1244_demo": _DEMO + ["model.patch_size=1", "model.base_channels=16",
                                   "model.channel_mult=1,2,4,4"],
    # the same idea without a full-res level: the patched U-Net with a shallow full-res path
    # (a 3×3 conv of the input, two at the end; model.full_res_channels)
    "patch2_b64_fr16": _P2 + ["train.batch_size=64", "model.full_res_channels=16"],
    "patch2_b64_fr8": _P2 + ["train.batch_size=64", "model.full_res_channels=8"],
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_fr16": _DEMO + ["model.full_res_channels=16"],
    # the decoder at the judged 64 px, patched 4×4 (the same 16 px first feature map and
    # U-Net as the demo's 32 px decoder patched 2×2) and no upsampler: "simple diffusion"'s
    # one-model route; small crosses were drawn as diamonds at 32 px and by the upsampler
    "p4_r64_demo": _DEMO + _R64,
    # ... predicting x₀ instead of v: a 4×4 patch is 48 numbers read into 32 channels, so the
    # v output (≈ ε at low noise) cannot hold each pixel's noise, and the samples kept it;
    # an x₀ output lets the noise pass through x_t (with Min-SNR the loss on the x₀ error is
    # the same: v-MSE · min(SNR, γ)/(SNR + 1) = x₀-MSE · min(SNR, γ))
    "p4_r64_demo_x0": _DEMO + _R64 + ["model.model_output=x0"],
    # the demo's 32 px recipe predicting x₀ (its U-Net need not carry the noise either)
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_x0": _DEMO + ["model.model_output=x0"],
    # the demo's recipe with the guidance's unconditional input (null embedding and null
    # caption) trained on 10 % + 0.9 × 2 % = 11.8 % of the examples instead of the independent
    # drops' 0.1 × 0.2 = 2 %
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_unc10": _DEMO + ["model.uncond_drop_prob=0.1"],
    # the demo's recipe with a residual MLP (64 → 256 → 64, SiLU) reading the CLIP embedding
    # before its projections: the demo CLIP codes shape along directions that differ between
    # the two sizes (RESULTS), which a linear read of the embedding cannot separate
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_cmlp256": _DEMO + ["model.clip_mlp=256"],
    # REPA (Yu et al. 2024): the U-Net's 4 px middle, through an MLP, aligned to the demo
    # CLIP's 4×4 patch tokens of the clean image (λ 0.5, the paper's), so the U-Net learns
    # early what the CLIP sees at each place; the frozen image tower runs in every step
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_repa05": _DEMO + ["model.repa_weight=0.5"],
    # the same with λ 0.1: at 0.5 the alignment term (≈ 0.02) was twice the weighted diffusion
    # loss and the denoising MSE stayed 10–20 % above the baseline's (RESULTS)
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_repa01": _DEMO + ["model.repa_weight=0.1"],
    # λ 0.5 on the noisier half of the steps only (t ≥ T/2), where the layout is still to be
    # decided; the low-noise steps, where the input already shows it, keep the diffusion loss
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_repa05h": _DEMO + ["model.repa_weight=0.5",
                                                         "model.repa_min_t=0.5"],
    # the demo's U-Net with plain resampling (nearest-neighbour + 3×3 conv up, strided conv down)
    # instead of residual up/down blocks: the 8 → 16 px up block is 23 % of its FLOPs (benched)
    "patch2_b64_noupdown": _P2 + ["train.batch_size=64", "model.resblock_updown=false"],
    # the demo's recipe with that plain resampling: 0.89× its step on the AVX2 machine
    # (BENCHMARKS.md), so the demo's 4600 steps would cost what 4100 cost now
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_noupdown": _DEMO + ["model.resblock_updown=false"],
    # capacity where the feature map is smallest: 128 channels at the 4 px level (and the
    # middle) instead of 64, the 16 and 8 px levels unchanged (hypothesis: which shape and
    # where are decided at the coarse levels, whose convolutions cost little at 4 × 4)
    "patch2_b64_m124": _P2 + ["train.batch_size=64", "model.channel_mult=1,2,4"],
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_m124": _DEMO + ["model.channel_mult=1,2,4"],
    # a deeper caption encoder (4 layers instead of 2; issue 20's "caption-encoder width and
    # depth"): binding and relation read the caption
    "patch2_b64_text4": _P2 + ["train.batch_size=64", "model.text_layers=4"],
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_text4": _DEMO + ["model.text_layers=4"],
    # self-conditioning (Chen et al. 2022): half the batches give the U-Net its own x₀ estimate
    # (a first forward pass without gradient) beside x_t, and the sampler gives every step the
    # previous step's x₀; ≈ 1/6 more compute a step (half the batches run one more forward)
    "patch2_b64_sc05": _P2 + ["train.batch_size=64", "model.self_condition=0.5"],
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_sc05": _DEMO + ["model.self_condition=0.5"],
    # Muon (Jordan et al. 2024) for the U-Net's and encoders' dense and conv kernels, AdamW for
    # the rest and for the input and output convolutions; the update scaled to AdamW's RMS
    # (Liu et al. 2025), so the demo's learning rate carries over (train/optim.py)
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon": _DEMO + _MUON,
    # its learning rate (Muon's and AdamW's groups together) halved, doubled, quadrupled
    "p2ln_cls_b64_lr15e4_tdrop02_snr2_muon": _DEMO + _MUON + ["optim.learning_rate=1.5e-3"],
    "p2ln_cls_b64_lr6e3_tdrop02_snr2_muon": _DEMO + _MUON + ["optim.learning_rate=6e-3"],
    "p2ln_cls_b64_lr12e3_tdrop02_snr2_muon": _DEMO + _MUON + ["optim.learning_rate=1.2e-2"],
    # logit-normal timesteps shifted towards low noise (loc −0.5), where small crosses are drawn
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_locm05": _DEMO + _MUON + ["model.timestep_loc=-0.5"],
    # logit-normal widened (scale 1.5): more of the steps at both ends of the schedule
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15": _LS15,
    # the widened distribution moved towards high noise, where variations' layout is decided
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15_loc05": _LS15 + ["model.timestep_loc=0.5"],
    # the sampled weights averaged over ~500 steps instead of ~200 (EMA decay 0.998; the EMA
    # starts at the initial weights, so a longer horizon would keep some of them: 0.999^3400 = 3 %)
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15_ema998": _LS15 + ["train.ema_decay=0.998"],
    # widened further (scale 2: 14 % of the steps below t/T 0.1 against scale 1.5's 7 %)
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls20": _DEMO + _MUON + ["model.timestep_scale=2.0"],
    # a narrower U-Net (24 / 48 / 48 channels, attention heads of 24: as many heads), for more
    # steps at equal cost: the 2.5× dearer 64-channel one lost far at equal cost
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15_w24": _LS15 + ["model.base_channels=24",
                                                             "model.head_channels=24"],
    # 8 CLIP context tokens instead of the paper's 4 (the narrower U-Net lost the big objects'
    # variations: the embedding's pathway may be short of capacity)
    "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15_tok8": _LS15 + ["model.num_clip_tokens=8"],
    "p2ln10_cls": _P2 + ["model.timestep_sampling=logit_normal", "model.timestep_loc=1.0",
                         "model.text_class_emb=true"],
    # GLIDE-style caption-only decoders, the same network and recipe as p2ln_cls / p2ln05_cls
    # (experiments/ablations/glide.py): the embedding always the learned null, caption drop 20 %
    "glide_p2ln_cls": _LN + ["model.text_class_emb=true", "model.clip_drop_prob=1",
                             "model.text_drop_prob=0.2"],
    "glide_p2ln05_cls": _P2 + ["model.timestep_sampling=logit_normal", "model.timestep_loc=0.5",
                               "model.text_class_emb=true", "model.clip_drop_prob=1",
                               "model.text_drop_prob=0.2"],
}
# recipes whose training step is the same computation as another's (only the timestep
# distribution, drop rates or learning rate differ): their cost is that recipe's
SAME_COST = {"patch2_logitnorm": "patch2", "patch2_lr2e3": "patch2", "patch2_edm": "patch2",
             "p2ln_lr2e3": "patch2", "p2ln_tdrop02": "patch2", "p2ln_loc05": "patch2",
             "p2ln_loc10": "patch2",
             "p2ln_nosnr": "patch2", "p2ln_b64": "patch2_b64", "p2ln_b128": "patch2_b128",
             "p2ln_cls": "patch2_cls", "p2ln_attn16": "patch2_attn16",
             "p2ln_cls_attn16": "patch2_attn16", "p2ln_cls_b64": "patch2_b64",
             "p2ln_cls_b64_lr2e3": "patch2_b64", "p2ln_cls_b64_lr3e3": "patch2_b64",
             "p2ln_cls_b64_lr3e3_tdrop02": "patch2_b64",
             "p2ln_cls_b64_lr5e3_tdrop02": "patch2_b64",
             "p2ln_cls_b64_lr3e3_tdrop02_nolv": "patch2_b64",
             "p2ln_cls_b64_lr3e3_tdrop02_nosnr": "patch2_b64",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2": "patch2_b64",
             "p2ln_cls_b64_lr3e3_tdrop02_snr1": "patch2_b64",
             "p2ln_cls_b64_lr3e3_tdrop02_snr3": "patch2_b64",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_res211": "patch2_b64_res211",
             "p2ln_cls_b128_lr5e3_tdrop02": "patch2_b128",
             "p2ln_cls_lr2e3": "patch2_cls",
             "p2ln_cls_lr2e3_tdrop02_snr2": "patch2_cls",
             "p1_w16_m1244_demo": "p1_w16_m1244_b64",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_fr16": "patch2_b64_fr16",
             "p4_r64_demo_x0": "p4_r64_demo",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_x0": "patch2_b64",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_unc10": "patch2_b64",
             # + 64·256·2 MACs an example: 0.04 % of the step's FLOPs
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_cmlp256": "patch2_b64",
             # the same step as λ 0.5's (only the weight differs)
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_repa01": "p2ln_cls_b64_lr3e3_tdrop02_snr2_repa05",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_repa05h": "p2ln_cls_b64_lr3e3_tdrop02_snr2_repa05",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_noupdown": "patch2_b64_noupdown",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_m124": "patch2_b64_m124",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_text4": "patch2_b64_text4",
             "p2ln_cls_b64_lr3e3_tdrop02_snr2_sc05": "patch2_b64_sc05",
             # Muon's learning rate and timesteps: the same step as the 3e-3 recipe's
             **{r: "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon" for r in (
                 "p2ln_cls_b64_lr15e4_tdrop02_snr2_muon", "p2ln_cls_b64_lr6e3_tdrop02_snr2_muon",
                 "p2ln_cls_b64_lr12e3_tdrop02_snr2_muon",
                 "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_locm05",
                 "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15",
                 "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15_loc05",
                 "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15_ema998",
                 "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls20",
                 # + 4 keys at the 8 px attention and 64 · 256 multiply-adds an example
                 "p2ln_cls_b64_lr3e3_tdrop02_snr2_muon_ls15_tok8")},
             "glide_p2ln_cls": "patch2_cls", "p2ln05_cls": "patch2_cls",
             "p2ln10_cls": "patch2_cls", "glide_p2ln05_cls": "patch2_cls"}


def add_chain_args(p: argparse.ArgumentParser) -> None:
    """The diagnosis scripts' common arguments: the decoder run and the demo chain around it."""
    p.add_argument("decoder", type=Path, help="a decoder run (runs/curve/...)")
    p.add_argument("--demo", type=Path, default=Path("runs/demo"),
                   help="the demo run whose CLIP, prior and upsampler complete the chain")


def append_row(out: Path, row: dict) -> None:
    """Append ``row`` to the JSON-lines file ``out`` and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def overrides(recipe: str, demo: Path, steps: int, seed: int) -> list[str]:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    d = demo.absolute()
    return BASE + [o.format(emb=d / "embeddings") for o in RECIPES[recipe]] + [
        f"model.clip_workdir={d}/clip", f"data.tokenizer={d}/tokenizer.model",
        f"train.steps={steps}", f"train.seed={seed}", f"train.ckpt_every={max(500, steps)}"]


def workdir(recipe: str, seed: int, steps: int) -> Path:
    return CURVE / f"{recipe}_s{seed}_{steps}"


def train(recipe: str, steps: int, seed: int, demo: Path, extra: list[str]) -> Path:
    from unclip_jax.core import config as config_lib
    from unclip_jax.train import loop, tasks

    wd = workdir(recipe, seed, steps)
    cfg = config_lib.load_config(ROOT / "experiments/shapes/decoder.py",
                                 overrides(recipe, demo, steps, seed) + list(extra))
    cfg, task = tasks.build_task(cfg, wd)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "recipe.json").write_text(json.dumps({"recipe": recipe, "steps": steps,
                                                "seed": seed, "extra": list(extra)}))
    t0 = time.perf_counter()
    loop.train(cfg, task, wd)
    print(f"trained {wd} in {time.perf_counter() - t0:.0f} s", flush=True)
    return wd


def load_chain(decoder: Path, demo: Path, upsampler: Path | None = None):
    """The demo's chain (its CLIP, prior and upsampler, or ``upsampler``) around the decoder run
    ``decoder``; a decoder that already draws at the upsampler's output size runs alone."""
    from unclip_jax.commands import demo as demo_lib
    from unclip_jax.pipelines import unclip
    from unclip_jax.train import runs

    up = upsampler or demo / "upsampler"
    needed = demo_lib.needs_upsampler(runs.load_config(decoder).model.image_size,
                                      runs.load_config(up).model.image_size)
    return unclip.load_unclip(demo / "clip", demo / "tokenizer.model", demo / "prior",
                              decoder, [up] if needed else [])


def with_samplers(model, decoder: str | None, upsampler: str | None,
                  guidance: float | None = None, interval: tuple[float, ...] | None = None):
    """``model`` with its decoder / upsampler sampling set from "method:spacing:steps" (e.g.
    "dpmpp_3m:logsnr:20"), the decoder's guidance scale and its guidance interval (σ_lo, σ_hi);
    None keeps the trained config's."""
    import dataclasses

    if guidance is not None:
        model = dataclasses.replace(model, decoder=dataclasses.replace(
            model.decoder, guidance_scale=float(guidance)))
    if interval is not None:
        model = dataclasses.replace(model, decoder=dataclasses.replace(
            model.decoder, guidance_interval=tuple(float(v) for v in interval)))
    def parse(spec):
        method, spacing, steps = spec.split(":")
        return {"sample_method": method, "sample_spacing": spacing, "sample_steps": int(steps)}

    if decoder:
        model = dataclasses.replace(model, decoder=dataclasses.replace(model.decoder,
                                                                      **parse(decoder)))
    if upsampler:
        model = dataclasses.replace(model, upsamplers=tuple(
            dataclasses.replace(u, **parse(upsampler)) for u in model.upsamplers))
    return model


def judge(decoder: Path, demo: Path, num: int, num_variations: int,
          decoder_sampler: str | None = None, upsampler_sampler: str | None = None,
          guidance: float | None = None, interval: tuple[float, ...] | None = None,
          upsampler: Path | None = None) -> dict:
    from unclip_jax.commands import demo as demo_lib

    model = load_chain(decoder, demo, upsampler)
    model = with_samplers(model, decoder_sampler, upsampler_sampler, guidance, interval)
    settings = {k: v for k, v in (("decoder", decoder_sampler),
                                  ("upsampler", upsampler_sampler)) if v is not None}
    settings["guidance"] = float(model.decoder.guidance_scale)
    if model.decoder.guidance_interval:
        settings["guidance_interval"] = list(model.decoder.guidance_interval)
    if upsampler is not None:
        settings["upsampler_run"] = str(upsampler)
    scores, _ = demo_lib.judge_chain(model, num=num, num_variations=num_variations)
    meta = json.loads((decoder / "recipe.json").read_text()) if (
        decoder / "recipe.json").is_file() else {"recipe": decoder.name}
    row = {**meta, "decoder": str(decoder), "num_per_kind": num,
           "num_variations": num_variations, "settings": settings,
           **{k: scores[k] for k in METRICS}, "exact": scores["exact"],
           "judged_wall_s": scores["judged_wall_s"],
           "load_average_1min": round(os.getloadavg()[0], 1)}
    CURVE.mkdir(parents=True, exist_ok=True)
    with open(CURVE / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def upsampler_check(demo: Path, specs: list[str], num: int, upsampler: Path | None = None):
    """The upsampler's ceiling under each sampler spec ("method:spacing:steps"): the held-out
    prompts' own 32 px renders → upsampler → the judge at 64 px, and the seconds per image."""
    import dataclasses

    import jax

    from unclip_jax.commands import demo as demo_lib
    from unclip_jax.core import shapes
    from unclip_jax.train.eval import metrics
    from unclip_jax.train import runs
    from unclip_jax.pipelines import unclip

    params, cfg = runs.load_upsampler(upsampler or demo / "upsampler")
    scenes = demo_lib.held_out_scenes(num=num)
    prompts = [shapes.caption(s) for s in scenes]
    x = np.stack([shapes.render(s, cfg.low_res_size) for s in scenes]) / 127.5 - 1
    out = []
    for spec in specs:
        method, spacing, steps = spec.split(":")
        c = dataclasses.replace(cfg, sample_method=method, sample_spacing=spacing,
                                sample_steps=int(steps))
        sched = unclip.upsampler_schedules([c], [int(steps)])
        fn = jax.jit(lambda p, lo, r: unclip.upsample_chain([c], [p], lo, r, schedules=sched))
        fn(params, x[:16].astype(np.float32), jax.random.PRNGKey(0)).block_until_ready()
        t0 = time.perf_counter()
        imgs = np.concatenate([unclip.to_uint8(fn(params, x[i:i + 16].astype(np.float32),
                                                  jax.random.PRNGKey(i)))
                               for i in range(0, len(x), 16)])
        sec = (time.perf_counter() - t0) / len(x)
        j = metrics.judge_scores(imgs, prompts)
        row = {"upsampler_sampler": spec, "s_per_image": round(sec, 4),
               **{k: j[k] for k in ("single_colour_shape", "two_both_colour_shape",
                                    "relation", "exact")},
               "load_average_1min": round(os.getloadavg()[0], 1)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def load_rows(costs: Path | list[Path]) -> list[dict]:
    """The judged rows with their recipe's quiet seconds per step (``costs``: bench JSON files,
    later files winning) and decoder CPU seconds."""
    cost = {r["recipe"]: r["s_per_step"]
            for f in ([costs] if isinstance(costs, Path) else costs)
            for r in json.loads(Path(f).read_text())}
    cost.update({k: cost[v] for k, v in SAME_COST.items() if v in cost and k not in cost})
    rows = [json.loads(line) for line in (CURVE / "rows.jsonl").read_text().splitlines()
            if line.strip()]
    for r in rows:
        r["s_per_step"] = cost.get(r["recipe"])
        r["cost_s"] = r["steps"] * r["s_per_step"] if r["s_per_step"] else None
    return rows


# the sampling every curve point is judged with (the demo's): decoder and upsampler
# DPM-Solver++(3M) on log-SNR-even steps, decoder guidance 3 (the configs')
CURVE_SETTINGS = {"decoder": "dpmpp_3m:logsnr:20", "upsampler": "dpmpp_3m:logsnr:10",
                  "guidance": 3.0}


def _settings(row: dict) -> dict:
    """A row's sampling settings; rows judged before the guidance was recorded used the curve
    runs' configured 3."""
    return {"guidance": 3.0, **row.get("settings", {})}


# the run the issue measures against, made before this study (session 7, RESULTS.md "The demo
# decoder trained 4× longer"): the pre-study recipe at 8000 steps, judged by the demo with DDIM
# 50 / 27 steps on that session's CLIP and prior (not re-judged: its workdir is gone)
REFERENCE = {"recipe": "baseline", "seed": "0 (session 7)", "steps": 8000,
             "recipe_cost": "baseline", "single_colour_shape": 0.891,
             "two_both_colour_shape": 0.141, "relation": 0.203, "variation_consistency": 0.656}


def report(costs: Path | list[Path], png: Path = PNG, settings: dict | None = None) -> str:
    """The markdown table of every point judged with ``settings`` (default
    :data:`CURVE_SETTINGS`; a decoder judged twice so: its last row) and the plot (one panel per
    measure, one line per recipe, x = decoder CPU minutes on a log scale)."""
    import sys

    sys.path.insert(0, str(ROOT / "experiments/ablations"))
    import common

    settings = CURVE_SETTINGS if settings is None else settings
    last = {r["decoder"]: r for r in load_rows(costs)
            if r["cost_s"] is not None and _settings(r) == settings}
    rows = list(last.values())
    cost = {r["recipe"]: r["s_per_step"] for r in rows}
    if REFERENCE["recipe_cost"] in cost:
        step = cost[REFERENCE["recipe_cost"]]
        rows.append({**REFERENCE, "s_per_step": step, "cost_s": REFERENCE["steps"] * step})
    lines = ["| recipe | seed | steps | s/step | decoder CPU s | single | two-object both | "
             "relation | variation consistency |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["recipe"], r["cost_s"], str(r["seed"]))):
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['steps']} | {r['s_per_step']:.3f} | "
                     f"{r['cost_s']:.0f} | " + " | ".join(f"{r[k]:.3f}" for k in METRICS) + " |")
    panels = []
    for key in METRICS:
        series = []
        for recipe in sorted({r["recipe"] for r in rows}):
            pts = sorted((r["cost_s"] / 60, r[key]) for r in rows if r["recipe"] == recipe)
            # several seeds at one cost: their mean
            xs = sorted({x for x, _ in pts})
            series.append((recipe, xs, [np.mean([y for x2, y in pts if x2 == x]) for x in xs]))
        panels.append({"title": key.replace("_", " "), "xlabel": "decoder CPU min",
                       "ylabel": "fraction", "series": series, "log_x": True})
    common.plot_panels(png, panels, width=420, legend="below")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("recipe")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--set", action="append", default=[], help="extra override")
    j = sub.add_parser("judge")
    j.add_argument("decoder", type=Path)
    j.add_argument("--num", type=int, default=128, help="held-out prompts of each kind")
    j.add_argument("--variations", type=int, default=16, help="renders for consistency")
    j.add_argument("--decoder-sampler", default=None, help="method:spacing:steps, e.g. "
                   "dpmpp_3m:logsnr:20 (default: the decoder config's)")
    j.add_argument("--upsampler-sampler", default=None, help="method:spacing:steps")
    j.add_argument("--guidance", type=float, default=None, help="decoder guidance scale")
    j.add_argument("--upsampler-run", type=Path, default=None,
                   help="another upsampler run instead of the demo's (rows leave the curve)")
    j.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide the decoder only where σ = √((1 − ᾱ)/ᾱ) is in (LO, HI]")
    u = sub.add_parser("upsampler", help="judge real renders through the upsampler")
    u.add_argument("specs", nargs="+", help="method:spacing:steps, e.g. ddim:even:27")
    u.add_argument("--num", type=int, default=128)
    u.add_argument("--upsampler", type=Path, default=None)
    r = sub.add_parser("report")
    r.add_argument("--costs", type=Path, nargs="+",
                   default=[ROOT / "benchmarks/results/bench_decoder_recipes.json"],
                   help="bench_decoder_recipes.py rows measured on a quiet machine")
    r.add_argument("--png", type=Path, default=PNG, help="where the plot goes")
    for p in (t, j, u, r):
        p.add_argument("--demo", type=Path, default=Path("runs/demo"))
    args = ap.parse_args(argv)
    if args.cmd == "train":
        train(args.recipe, args.steps, args.seed, args.demo, args.set)
    elif args.cmd == "judge":
        judge(args.decoder, args.demo, args.num, args.variations, args.decoder_sampler,
              args.upsampler_sampler, args.guidance,
              None if args.guidance_interval is None
              else tuple(float(v) for v in args.guidance_interval.split(",")),
              args.upsampler_run)
    elif args.cmd == "upsampler":
        upsampler_check(args.demo, args.specs, args.num, args.upsampler)
    else:
        print(report(args.costs, args.png))


if __name__ == "__main__":
    main()
