"""The package's layers (docs/architecture.md): every import, at module level or inside a
function, points to the importing module's own layer or a lower one, so model code stays pure
and the layers cannot drift back into a tangle."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unclip_jax"

# low to high; a top-level module or subpackage of unclip_jax -> its layer
LAYERS = {
    "core": ("config", "sharding", "images", "text", "shapes", "augment", "ar", "diffusion",
             "nn"),
    "models": ("models",),
    "data": ("datasets", "input_pipeline"),
    "training and runs": ("train", "eval", "embeddings", "runs"),
    "pipelines": ("pipelines", "convert", "describe"),
    "commands": ("commands", "cli", "demo", "launch"),
}
RANK = {name: i for i, names in enumerate(LAYERS.values()) for name in names}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


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


def test_every_module_has_a_layer():
    unassigned = sorted({top_level("unclip_jax." + ".".join(
        p.relative_to(PACKAGE).with_suffix("").parts)) for p in module_files()} - set(RANK))
    assert not unassigned, (f"modules without a layer: {unassigned}; add them to LAYERS here "
                            f"and to docs/architecture.md")


def test_no_import_points_to_a_higher_layer():
    upward = []
    for path in module_files():
        me = top_level("unclip_jax." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for line, module in imports_of(path):
            other = top_level(module)
            if other is None or other == me or other not in RANK or me not in RANK:
                continue
            if RANK[other] > RANK[me]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({LAYER_OF[me]}) "
                              f"imports {module} ({LAYER_OF[other]})")
    assert not upward, "imports into a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("source, expect", [
    ("from unclip_jax.train import loop\n", "unclip_jax.train"),
    ("def f():\n    from unclip_jax import embeddings\n", "unclip_jax.embeddings"),
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
