"""unclip_jax: CLIP, DALL·E and DALL·E 2 (unCLIP) in JAX/Flax.

The folders are the layers, low to high; a module imports only its own layer or lower ones,
also inside functions (``tests/test_layers.py``; ``docs/architecture.md``):

* :mod:`.core` — configs, sharding, images, tokenizer, the shapes world, augmentation, the AR
  decoder, diffusion (schedules, losses, the one sampler) and network blocks (``nn``);
* :mod:`.models` — pure model families: modules, configs, losses, denoisers;
* :mod:`.data` — datasets and the input pipeline (image and embedding batches);
* :mod:`.train` — the loop, one task per family, evaluation, the embedding cache and the one
  loader of trained runs;
* :mod:`.pipelines` — the one place stages are sampled, weight import (``convert``),
  ``describe``;
* :mod:`.commands` — the ``unclip-jax`` CLI, the demo and the local multi-process launcher.

The flat module paths of release 0.1 (``unclip_jax.config``, ``unclip_jax.diffusion.sampler``,
``unclip_jax.runs``, …) still import, as the same module objects, with a
``DeprecationWarning``; they go in the next release (:data:`MOVED`).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module path (under unclip_jax.) -> today's; submodules of a moved package follow it
MOVED = {
    "config": "core.config", "sharding": "core.sharding", "images": "core.images",
    "text": "core.text", "shapes": "core.shapes", "augment": "core.augment", "ar": "core.ar",
    "diffusion": "core.diffusion", "nn": "core.nn",
    "datasets": "data", "input_pipeline": "data.input_pipeline",
    "eval": "train.eval", "embeddings": "train.embeddings", "runs": "train.runs",
    "convert": "pipelines.convert", "describe": "pipelines.describe",
    "cli": "commands.cli", "demo": "commands.demo", "launch": "commands.launcher",
}


def moved_to(name: str) -> str | None:
    """Today's path of an old module path (``unclip_jax.diffusion.sampler`` ->
    ``unclip_jax.core.diffusion.sampler``), or None when ``name`` did not move."""
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != __name__ or parts[1] not in MOVED:
        return None
    return ".".join([__name__, MOVED[parts[1]], *parts[2:]])


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module at its new path (the same object, not a copy)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if moved_to(name) else None

    def create_module(self, spec):
        new = moved_to(spec.name)
        warnings.warn(f"{spec.name} is now {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__     # the import machinery overwrites __spec__
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
