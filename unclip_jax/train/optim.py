"""The optimizer from config: AdamW or Muon, linear warm-up + cosine decay, global-norm
clipping.

Weight decay applies to weight matrices and conv kernels only (leaves named ``kernel``);
norm scales, biases, embeddings, position embeddings and scalars such as CLIP's logit scale
are not decayed.

``optimizer="muon"`` (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): the dense
(rank 2, ``[in, out]``) and convolution (rank 4, ``[kh, kw, in, out]``) kernels take
Nesterov momentum orthogonalised by five Newton–Schulz iterations, the kernel read as the
matrix ``[kh·kw·in, out]``; every other leaf (biases, norms, embeddings, the rank-3 attention
projections whose input axes a shape does not tell, and the kernels of
``muon_adamw_modules``, e.g. a U-Net's input and output convolutions) keeps AdamW with the
config's b1, b2, eps and decay mask. The orthogonalised update is scaled by
0.2·√max(fan_in, fan_out) (Liu et al. 2025, "Muon is scalable for LLM training"), which gives
it AdamW's update RMS, so one learning rate and weight decay serve both groups.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from unclip_jax.core.config import OptimConfig

SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "muon")
MUON_RMS = 0.2          # Liu et al. 2025: AdamW's typical update RMS


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}; accepted: "
                         f"{', '.join(SCHEDULES)}")
    warmup = max(0, min(cfg.warmup_steps, total_steps))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(cfg.learning_rate, max(1, total_steps - warmup),
                                            alpha=cfg.end_lr_factor)
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: ``kernel`` leaves with at least 2 dimensions."""
    def decide(path, leaf):
        keys = _leaf_keys(path)
        return bool(keys) and keys[-1] == "kernel" and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(decide, params)


def _leaf_keys(path) -> list[str]:
    # Dict keys only: a LogicallyPartitioned box adds a trailing ".value" attribute.
    return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def muon_labels(params: Any, adamw_modules: tuple[str, ...] = ()) -> Any:
    """``"muon"`` for the kernels Muon updates (rank 2 or 4, not under ``adamw_modules``),
    ``"adamw"`` for every other leaf."""
    seen: set[str] = set()

    def label(path, leaf):
        keys = _leaf_keys(path)
        seen.update(keys)
        matrix = bool(keys) and keys[-1] == "kernel" and leaf.ndim in (2, 4)
        return "muon" if matrix and not set(keys[:-1]) & set(adamw_modules) else "adamw"
    labels = jax.tree_util.tree_map_with_path(label, params)
    unknown = [m for m in adamw_modules if m not in seen]
    if unknown:
        raise ValueError(f"optim.muon_adamw_modules names {', '.join(map(repr, unknown))}, "
                         "which no parameter path contains")
    return labels


NS_COEFFS = (3.4445, -4.7750, 2.0315)   # Jordan et al. 2024's quintic


def newton_schulz(g: jax.Array, steps: int = 5, eps: float = 1e-8) -> jax.Array:
    """The approximate orthogonal factor of a matrix ``g``: ``steps`` quintic iterations
    X ← aX + (bA + cA²)X, A = XXᵀ, from X = g/‖g‖_F on the orientation with fewer rows (r × c).

    Each iteration is a polynomial in A applied on the left, so X_k = M_k X₀ with an r × r M_k,
    and A_k = M_k (X₀X₀ᵀ) M_kᵀ. When c ≥ 2r (a 3 × 3 conv kernel's 9·in × out matrix) the
    iterations run on those r × r matrices, 8r³ each plus 4r²c once, instead of 4r²c + 2r³ each
    on X: the same function, about 2.5× fewer multiply-adds for the U-Net's kernels."""
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / (jnp.linalg.norm(x) + eps)
    a, b, c = NS_COEFFS
    r, cols = x.shape
    if cols >= 2 * r:
        gram, eye = x @ x.T, jnp.eye(r, dtype=x.dtype)
        m = eye
        for _ in range(steps):
            am = m @ gram @ m.T
            m = (a * eye + b * am + c * am @ am) @ m
        x = m @ x
    else:
        for _ in range(steps):
            am = x @ x.T
            x = a * x + (b * am + c * am @ am) @ x
    return x.T if tall else x


class MuonState(NamedTuple):
    count: jax.Array
    mu: Any


def scale_by_muon(momentum: float, ns_steps: int = 5) -> optax.GradientTransformation:
    """Nesterov momentum (bias-corrected, as optax's ``contrib.scale_by_muon``), orthogonalised
    per kernel ``[..., in, out]`` read as the matrix ``[prod(...)·in, out]``, scaled by
    0.2·√max(fan_in, fan_out) to AdamW's update RMS."""
    def init(params):
        return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def orthogonalise(u):
        matrix = u.reshape(-1, u.shape[-1])
        return MUON_RMS * max(matrix.shape) ** 0.5 * newton_schulz(matrix, ns_steps).reshape(
            u.shape)

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, state.mu, updates)
        # Nesterov: the next step's momentum, each term bias-corrected
        step = lambda m, g: (momentum * m / (1 - momentum ** (count + 1))  # noqa: E731
                             + (1 - momentum) * g / (1 - momentum ** count))
        return jax.tree.map(lambda m, g: orthogonalise(step(m, g)), mu, updates), MuonState(
            count, mu)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; accepted: "
                         f"{', '.join(OPTIMIZERS)}")
    if cfg.optimizer == "muon" and not 0.0 <= cfg.muon_momentum < 1.0:
        raise ValueError(f"optim.muon_momentum must be in [0, 1), got {cfg.muon_momentum}")
    lr = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "muon":
        muon = optax.chain(scale_by_muon(cfg.muon_momentum),
                           optax.add_decayed_weights(cfg.weight_decay),
                           optax.scale_by_learning_rate(lr))
        update = optax.partition(
            {"muon": muon, "adamw": adamw},
            lambda params: muon_labels(params, tuple(cfg.muon_adamw_modules)))
    else:
        update = adamw
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*clip, update)
