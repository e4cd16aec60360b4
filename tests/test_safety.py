"""No unsafe loading in the package: no pickle, eval/exec, or torch.load without weights_only."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unclip_jax"

FORBIDDEN = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bcloudpickle\b"), "cloudpickle"),
    (re.compile(r"(?<![\w.])eval\("), "eval("),
    (re.compile(r"(?<![\w.])exec\("), "exec("),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
]


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10, "package sources not found"
    return files


def test_no_pickle_eval_or_exec_in_package():
    hits = []
    for path in _sources():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, name in FORBIDDEN:
                if pattern.search(code):
                    hits.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {name}")
    assert not hits, "unsafe calls:\n" + "\n".join(hits)


def test_torch_load_always_weights_only():
    hits = []
    for path in _sources():
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start(): text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                lineno = text[: match.start()].count("\n") + 1
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}")
    assert not hits, "torch.load without weights_only=True:\n" + "\n".join(hits)


def test_library_never_imports_torch_at_module_level():
    pattern = re.compile(r"^(import torch|from torch)", re.M)
    hits = [str(p.relative_to(PACKAGE.parent)) for p in _sources()
            if pattern.search(p.read_text())]
    assert not hits, f"top-level torch imports: {hits}"
