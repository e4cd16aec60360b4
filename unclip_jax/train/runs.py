"""Trained runs: the one loader of what a training run wrote into its workdir.

A run's workdir holds ``config.json`` (:func:`unclip_jax.core.config.to_dict` of the experiment
config the task resolved) and ``checkpoints/``. :func:`load_run` reads both back: the config
as dataclasses (:func:`unclip_jax.core.config.from_dict` with every model family's config class),
the params of the latest (or a given) step, the EMA params when the run kept them unless told
otherwise. Every caller that needs a trained model — the tasks that freeze one (the decoder's
CLIP, DALL·E's dVAE), the embedding cache, the evaluations, the pipelines, the commands —
goes through here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.core.config import ExperimentConfig, from_dict
from unclip_jax.models.clip import CLIPConfig, FrozenCLIP
from unclip_jax.models.dalle import DalleConfig
from unclip_jax.models.decoder import DecoderConfig, UpsamplerConfig
from unclip_jax.models.dvae import DVAEConfig
from unclip_jax.models.prior import PriorConfig
from unclip_jax.models.prior_ar import ARPriorConfig
from unclip_jax.train.checkpoint import Checkpointer

MODEL_CONFIGS = {c.__name__: c for c in (CLIPConfig, PriorConfig, ARPriorConfig, DecoderConfig,
                                         UpsamplerConfig, DVAEConfig, DalleConfig)}


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run: its workdir, resolved config, params (host arrays) and their step."""

    workdir: Path
    config: ExperimentConfig
    params: Any
    step: int
    ema: bool                   # whether ``params`` are the EMA params

    @property
    def model(self):
        """The model's config (``config.model``)."""
        return self.config.model


def read_run_config(workdir: str | os.PathLike) -> dict:
    """The ``config.json`` a training run wrote into ``workdir`` (a clear error if absent)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist; pass the folder a "
                                f"training run wrote (it holds config.json and checkpoints/)")
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {str(workdir)!r} is not the "
                                f"workdir of a training run (expected config.json and "
                                f"checkpoints/)")
    return json.loads(path.read_text())


def model_type(run_cfg: dict) -> str | None:
    """The model config's class name a run's ``config.json`` records."""
    return run_cfg.get("model", {}).get("__type__")


def load_config(workdir: str | os.PathLike, expect: type | None = None) -> ExperimentConfig:
    """The resolved :class:`ExperimentConfig` of a run; ``expect``: the model config class it
    must hold (a ValueError naming both otherwise)."""
    return _config(workdir, read_run_config(workdir), expect)


def _config(workdir, run_cfg: dict, expect: type | None) -> ExperimentConfig:
    found = model_type(run_cfg)
    if expect is not None and found not in (None, expect.__name__):
        raise ValueError(f"{str(workdir)!r} holds a {found} run, not a {expect.__name__}")
    model = from_dict(run_cfg.get("model", {}), MODEL_CONFIGS, default=expect)
    rest = {k: v for k, v in run_cfg.items() if k != "model"}
    rest.setdefault("__type__", "ExperimentConfig")
    rest.setdefault("name", Path(workdir).name)
    return dataclasses.replace(from_dict({**rest, "model": None}, MODEL_CONFIGS), model=model)


def load_run(workdir: str | os.PathLike, expect: type | None = None, *,
             ema: bool | None = None, step: int | None = None) -> Run:
    """A trained run's config and params (host arrays).

    ``expect``: the model config class the run must hold. ``ema``: None = the EMA params when
    the run kept them (``train.ema_decay > 0``), else the raw ones; True requires them; False
    takes the raw params. ``step``: None = the latest complete checkpoint."""
    run_cfg = read_run_config(workdir)
    cfg = _config(workdir, run_cfg, expect)
    ckpt_dir = Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{str(workdir)!r} has no checkpoints/ folder; train it first")
    has_ema = cfg.train.ema_decay > 0
    if ema and not has_ema:
        raise ValueError(f"{str(workdir)!r} kept no EMA params (train.ema_decay = 0)")
    use_ema = has_ema if ema is None else bool(ema)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {ckpt.directory}")
        params = ckpt.restore_params(step, which="ema_params" if use_ema else "params")
    finally:
        ckpt.close()
    return Run(Path(workdir), cfg, params, int(step), use_ema)


def load_model(workdir: str | os.PathLike, expect: type, ema: bool | None = None
               ) -> tuple[Any, Any]:
    """``(params on the default device, model config)`` of a run holding ``expect``."""
    run = load_run(workdir, expect, ema=ema)
    return jax.tree.map(jnp.asarray, run.params), run.model


def load_clip(clip_workdir: str | os.PathLike) -> FrozenCLIP:
    """The frozen CLIP of a trained CLIP run (EMA params when it kept them)."""
    if not clip_workdir:
        raise ValueError("model.clip_workdir is empty: this model needs a trained CLIP run "
                         "(e.g. --set model.clip_workdir=runs/demo/clip)")
    run = load_run(clip_workdir, CLIPConfig)
    return FrozenCLIP(run.model, jax.tree.map(jnp.asarray, run.params))


def tokenizer_path(workdir: str | os.PathLike, run_cfg: dict | None = None) -> Path:
    """The tokenizer a run was trained with: its ``data.tokenizer``, else
    ``<workdir>/tokenizer.model``, else ``<workdir>/../tokenizer.model`` (the demo layout)."""
    run_cfg = read_run_config(workdir) if run_cfg is None else run_cfg
    named = run_cfg.get("data", {}).get("tokenizer", "")
    candidates = ([Path(named)] if named else []) + [
        Path(workdir) / "tokenizer.model", Path(workdir).parent / "tokenizer.model"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no tokenizer for the run {str(workdir)!r}; looked at "
                            f"{', '.join(map(str, candidates))}; pass tokenizer_path")


# ----------------------------------------------------------------------------- by family


def load_decoder(workdir: str | os.PathLike, ema: bool | None = None
                 ) -> tuple[Any, DecoderConfig]:
    """``(params, DecoderConfig)`` of a decoder run (``ema`` as in :func:`load_run`)."""
    return load_model(workdir, DecoderConfig, ema)


def load_upsampler(workdir: str | os.PathLike, ema: bool | None = None
                   ) -> tuple[Any, UpsamplerConfig]:
    """``(params, UpsamplerConfig)`` of an upsampler run."""
    return load_model(workdir, UpsamplerConfig, ema)


def load_dvae(workdir: str | os.PathLike):
    """``(DVAE module, params)`` of a dVAE run (trained or converted)."""
    from unclip_jax.models.dvae import DVAE

    run = load_run(workdir, DVAEConfig)
    return DVAE(run.model), run.params


def load_dalle(workdir: str | os.PathLike):
    """A DALL·E run: ``(DalleConfig, params, tokenizer, dvae_module, dvae_params)`` (the dVAE
    the run was trained with)."""
    from unclip_jax.core.text import Tokenizer

    run = load_run(workdir, DalleConfig)
    tok = run.config.data.tokenizer or str(Path(workdir) / "tokenizer.model")
    dvae_model, dvae_params = load_dvae(run.model.dvae_workdir)
    return run.model, run.params, Tokenizer.load(tok), dvae_model, dvae_params


def load_prior(workdir: str | os.PathLike, **settings):
    """The diffusion prior of a run as a :class:`~unclip_jax.models.sampling.PriorSampler`
    (``settings``: its sampling settings; defaults from the run's config)."""
    from unclip_jax.models.prior import DiffusionPrior
    from unclip_jax.models.sampling import PriorSampler

    run = load_run(workdir, PriorConfig)
    return PriorSampler(DiffusionPrior(run.model), run.params, **settings)


def load_prior_ar(workdir: str | os.PathLike, *, step: int | None = None,
                  use_ema: bool = True, **settings):
    """The AR prior of a run as ``fn(inputs, rng) -> [B, E]`` unit-norm embeddings
    (``settings``: those of :func:`unclip_jax.models.prior_ar.make_sampler`)."""
    from unclip_jax.models import prior_ar

    run = load_run(workdir, ARPriorConfig, step=step, ema=None if use_ema else False)
    pca, sim = prior_ar.load_quantizers(Path(workdir) / prior_ar.QUANTIZER_FILE)
    sample = prior_ar.make_sampler(run.model, pca, sim, **settings)
    return lambda inputs, rng: sample(run.params, inputs, rng)
