"""The train state carried through every jitted step: step, params, optimizer state, EMA, rng."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a step needs and a checkpoint stores.

    ``rng`` is the run's base key; the key of step ``s`` is ``fold_in(rng, s)``, so a resumed run
    draws exactly the noise the uninterrupted one would have drawn. ``ema_params`` is an empty
    dict when EMA is off. ``skipped`` counts updates dropped for a non-finite loss/gradient.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    skipped: jax.Array

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array, ema: bool):
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params) if ema else {},
            rng=rng,
            skipped=jnp.zeros((), jnp.int32),
        )

    def step_rng(self) -> jax.Array:
        return jax.random.fold_in(self.rng, self.step)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``ema ← decay·ema + (1−decay)·params`` leaf by leaf (no-op for an empty EMA)."""
    if not jax.tree.leaves(ema):
        return ema
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
