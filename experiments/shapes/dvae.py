"""Tiny dVAE on 32 px captioned shapes: 8×8 grid of K=512 codes (CPU scale, a few minutes).

The annealing lengths are the paper's shape scaled to a short run: τ 1 → 1/16 (cosine) over
most of the run, β ramped (cosine) over its first fifth. β's end value is the paper's 6.6
scaled by pixel values per code: the paper has 8×8×3 = 192 per cell (256 px → 32×32), this
config 4×4×3 = 48, so 6.6 × 48/192 = 1.65 puts the same price on a nat of code information
per pixel value. (With the unscaled 6.6 an 800-step run collapsed to ~6 effective codes and
16 dB PSNR.)

Measured (2 shared CPU cores, 800 steps, 7.7 min): validation PSNR 15.6 dB with argmax codes,
code perplexity 4.8, 4.3 % of the 512 codes used — the codebook collapses at this budget (a
β = 0 probe collapsed to a single code too, so it is the relaxation's optimisation, not the
KL); this config is a smoke run of the pipeline, not yet a usable tokenizer.

Probes (200 steps, batch 32, same data, validation argmax PSNR / used fraction), none escaping
the background-only solution (~16.5 dB, the PSNR of predicting the background everywhere;
shapes cover ~7.6 % of pixels): baseline 16.6 dB/0.2 %; β = 0 16.2/1.2 %; decoder input 1×1
init N(0, 1) instead of fan-in 16.5/0.6 %; plus AdamW b2 0.999, eps 1e-8 16.6/0.8 %; 8-bit
dequantisation noise 16.5/0.2 %; no gradient clipping 16.7/0.4 %; soft floor ln b ≥ -2.3
16.4/4.3 %; lr 3e-4 16.6/0.2 %; and a noise-free softmax bottleneck (no gumbel) with β = 0
15.9/2.3 %. So neither the relaxation, the KL, the decoder-input init nor Adam settings are
the cause at this budget; untested: an MSE-likelihood probe (the logit-Laplace is
median-seeking, and the per-pixel median of a mostly black image is black) and larger widths.
"""

from unclip_jax.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from unclip_jax.models.dvae import DVAEConfig
from unclip_jax.sharding import MeshConfig

STEPS = 800


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="shapes_dvae",
        task="dvae",
        model=DVAEConfig(image_size=32, num_groups=3, blocks_per_group=1, encoder_width=16,
                         decoder_width=16, decoder_init_width=32, vocab_size=512,
                         tau_steps=STEPS * 4 // 5, beta_steps=STEPS // 5,
                         beta_max=1.65),   # 6.6 × 48/192
        data=DataConfig(name="captioned_shapes/r32", image_size=32),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, weight_decay=0.0),
        train=TrainConfig(batch_size=32, steps=STEPS, log_every=100, eval_every=400,
                          ckpt_every=400, ema_decay=0.0),
        mesh=MeshConfig(data=-1, fsdp=1, model=1),
    )
