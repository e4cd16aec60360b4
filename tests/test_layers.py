"""The package's layers (docs/architecture.md): every import, at module level or inside a
function, points to the importing module's own layer or a lower one, so model code stays pure
and the layers cannot drift back into a tangle."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unclip_jax"

# The package's folders are its layers, low to high: a module imports only its own folder's
# modules or a lower folder's (docs/architecture.md)
LAYERS = ("core", "models", "data", "train", "pipelines", "commands")
RANK = {name: i for i, name in enumerate(LAYERS)}


def top_level(module: str) -> str | None:
    """``unclip_jax.models.decoder`` -> ``models`` (None outside the package)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "unclip_jax" and len(parts) > 1 else None


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path``, wherever it stands."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if path.name != "__init__.py" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.append((node.lineno, module))
            # `from unclip_jax import models` names a subpackage, not an attribute
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names
                    if module == "unclip_jax"]
    return out


def module_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or
                  p.name != "__init__.py")


def test_every_module_is_in_a_layer_folder():
    unassigned = sorted({top_level("unclip_jax." + ".".join(
        p.relative_to(PACKAGE).with_suffix("").parts)) for p in module_files()} - set(RANK))
    assert not unassigned, (f"modules outside the layer folders: {unassigned}; move them into "
                            f"one of {', '.join(LAYERS)} (docs/architecture.md)")


def test_no_import_points_to_a_higher_layer():
    upward = []
    for path in module_files():
        me = top_level("unclip_jax." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for line, module in imports_of(path):
            other = top_level(module)
            if other is None or other == me or me not in RANK:
                continue
            if other not in RANK:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}, "
                              f"which is in no layer (an old path: see unclip_jax.MOVED)")
            elif RANK[other] > RANK[me]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({me}) "
                              f"imports {module} ({other})")
    assert not upward, "imports into a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("source, expect", [
    ("from unclip_jax.train import loop\n", "unclip_jax.train"),
    ("def f():\n    from unclip_jax.train import embeddings\n", "unclip_jax.train"),
    ("from unclip_jax import commands\n", "unclip_jax.commands"),
    ("from unclip_jax import runs\n", "unclip_jax.runs"),          # an old path, in no layer
    ("import unclip_jax.pipelines.unclip as U\n", "unclip_jax.pipelines.unclip"),
])
def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch, source, expect):
    """The checker itself can fail: imports at module level, inside functions and aliased are
    all found (a planted upward import in a fake models module is reported)."""
    fake = tmp_path / "unclip_jax" / "models"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "unclip_jax")
    assert expect in [m for _, m in imports_of(fake / "bad.py")]
    with pytest.raises(AssertionError, match="imports into a higher layer"):
        test_no_import_points_to_a_higher_layer()


@pytest.mark.parametrize("old, new", [
    ("unclip_jax.config", "unclip_jax.core.config"),
    ("unclip_jax.diffusion.sampler", "unclip_jax.core.diffusion.sampler"),
    ("unclip_jax.datasets.captioned_shapes", "unclip_jax.data.captioned_shapes"),
    ("unclip_jax.runs", "unclip_jax.train.runs"),
    ("unclip_jax.eval.metrics", "unclip_jax.train.eval.metrics"),
    ("unclip_jax.launch", "unclip_jax.commands.launcher"),
])
def test_old_flat_paths_import_the_moved_module_with_a_deprecation(old, new):
    """Release 0.1's paths keep working for one release: the same module object (so patches
    and isinstance checks agree), its own spec untouched, and a warning naming the new path."""
    import importlib

    import unclip_jax

    assert unclip_jax.moved_to(old) == new
    module = importlib.import_module(new)
    for name in [n for n in sys.modules if n == old or n.startswith(old + ".")]:
        del sys.modules[name]          # so the old path is imported (and warns) here
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        aliased = importlib.import_module(old)
    assert aliased is module and module.__spec__.name == new and module.__name__ == new


def test_unmoved_paths_are_not_aliased():
    import unclip_jax

    assert unclip_jax.moved_to("unclip_jax.models.decoder") is None
    assert unclip_jax.moved_to("unclip_jax.core.config") is None
    with pytest.raises(ModuleNotFoundError):
        __import__("unclip_jax.nothing_here")


def test_tests_experiments_and_benchmarks_use_todays_paths():
    """Only users outside the repo should ever see the deprecation: the repo's own scripts and
    tests import every module at its layer folder's path."""
    old = []
    for folder in ("tests", "experiments", "benchmarks", "docs", "data"):
        for path in sorted((PACKAGE.parent / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                             if node.module == "unclip_jax" else [])
                old += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {n}"
                        for n in names if top_level(n) not in (None, *RANK, "MOVED",
                                                                "moved_to")]
    assert not old, "old module paths:\n" + "\n".join(old)
