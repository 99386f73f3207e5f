"""Security rules as tests: artifacts are loaded with safetensors or `torch.load(...,
weights_only=True)`, never unpickled; no unsafe YAML loads, no `eval`/`exec`.

The artifact store is shared by the API, the workers, the trainer and the scorer, so
a file in it must never be able to run code in the process that reads it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mates

PACKAGE = Path(mates.__file__).parent
SERVICES = PACKAGE.parent.parent / "services"
MODULES = sorted(PACKAGE.rglob("*.py")) + sorted(SERVICES.rglob("*.py"))

# Modules whose loaders run code from the data they read.
PICKLE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def _dotted(node: ast.AST) -> str:
    """`torch.load` for `torch.load`, `np.load` for `np.load`; '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> what it is: `np` -> `numpy`, `load` (from torch) -> `torch.load`."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every unsafe deserialization in `source`, as 'file:line: what'."""
    tree = ast.parse(source, filename=filename)
    aliases = _aliases(tree)
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for m in modules:
                if m.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {m} (its loaders run code from the data)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        if full == "torch.load" and not _keyword_is(node, "weights_only", True):
            flag(node, "torch.load without weights_only=True")
        elif full == "numpy.load" and not (
            _keyword_is(node, "allow_pickle", False)
            or all(k.arg != "allow_pickle" for k in node.keywords)
        ):
            flag(node, "numpy.load with allow_pickle")
        elif full.endswith("read_pickle"):
            flag(node, f"{full} unpickles")
        elif full in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            flag(node, f"{full} (use yaml.safe_load)")
        elif full in ("eval", "exec"):
            flag(node, f"{full}() runs code")
    return found


def test_the_scanner_finds_each_unsafe_load():
    bad = """
import pickle
import numpy as np
import torch
from torch import load as tload
import pandas as pd
import yaml
import joblib
pickle.load(open("a", "rb"))
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
tload("m.pt")
np.load("a.npy", allow_pickle=True)
pd.read_pickle("a.pkl")
yaml.load(open("c.yaml"), Loader=yaml.Loader)
eval("1 + 1")
"""
    found = unsafe_loads(bad)
    assert [f.split(": ", 1)[1] for f in found] == [
        "imports pickle (its loaders run code from the data)",
        "imports joblib (its loaders run code from the data)",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "numpy.load with allow_pickle",
        "pandas.read_pickle unpickles",
        "yaml.load (use yaml.safe_load)",
        "eval() runs code",
    ], found
    good = """
import numpy as np
import torch
import yaml
from safetensors.torch import load_file
torch.load("opt.pt", map_location="cpu", weights_only=True)
np.load("a.npy")
np.load("a.npy", mmap_mode="r", allow_pickle=False)
yaml.safe_load("a: 1")
model.eval()
load_file("model.safetensors")
"""
    assert unsafe_loads(good) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent.parent)))
def test_no_unsafe_deserialization_in_the_library_or_services(path: Path):
    assert unsafe_loads(path.read_text(encoding="utf-8"), str(path)) == []


def test_the_scan_sees_the_real_loaders():
    """Not vacuous: the scanned code does load checkpoints, the safe way."""
    calls = []
    for path in MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                head, _, rest = _dotted(node.func).partition(".")
                if aliases.get(head, head) + (f".{rest}" if rest else "") in (
                    "torch.load",
                    "safetensors.torch.load_file",
                ):
                    calls.append(path.name)
    # the LM checkpoint (mates/train.py) and the influence model (mates/influence/scorer.py)
    assert "train.py" in calls and "scorer.py" in calls, calls
