"""The optimizer from config: AdamW, linear warm-up + cosine decay, global-norm clipping.

Weight decay applies to weight matrices and conv kernels only (leaves named ``kernel``);
norm scales, biases, embeddings, position embeddings and scalars such as CLIP's logit scale
are not decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from unclip_jax.core.config import OptimConfig

SCHEDULES = ("cosine", "constant")


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
        # The last dict key names the leaf (a LogicallyPartitioned box adds a trailing ".value").
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(keys) and keys[-1] == "kernel" and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
