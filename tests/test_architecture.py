"""Architecture rules as tests: one place builds artifact paths, one place prints, no unseeded RNG."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mates

PACKAGE = Path(mates.__file__).parent
SERVICES = PACKAGE.parent.parent / "services"  # the services import the library; same rules
MODULES = sorted(PACKAGE.rglob("*.py")) + sorted(SERVICES.rglob("*.py"))
LEGACY_NP_RANDOM = {"seed", "rand", "randn", "randint", "random", "choice", "permutation",
                    "shuffle", "normal", "uniform", "gumbel", "default_rng"}
STDLIB_RANDOM = {"random", "randint", "choice", "choices", "shuffle", "sample", "uniform", "gauss",
                 "seed"}


# Names of the files and folders under a run dir, as `RunPaths` builds them (a string
# constant, or an f-string part, equal to one of these is a path being built by hand).
RUN_NAMES = {"stage-", "run.json", "metrics.jsonl", "events.jsonl", "pool.json", "selection.json",
             "probes.jsonl", "scores.jsonl", "influence-model", "final-model", "checkpoint",
             "tokenized", "tokenizer", "cancel"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent.parent))


def test_modules_are_found():
    names = {p.name for p in MODULES}
    assert {"artifacts.py", "run.py", "selection.py", "cli.py", "tasks.py", "app.py"} <= names


def test_only_artifacts_builds_run_paths():
    offenders = []
    for path in MODULES:
        if path.name == "artifacts.py":
            continue
        tree = _tree(path)
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docs
                    and node.value in RUN_NAMES):
                offenders.append(f"{_rel(path)}:{node.lineno}: {node.value!r}")
    assert offenders == [], "artifact paths must come from mates.artifacts.RunPaths"


def test_only_the_cli_prints():
    offenders = []
    for path in MODULES:
        if path.name == "cli.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{_rel(path)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("path", MODULES, ids=[_rel(p) for p in MODULES])
def test_no_unseeded_randomness(path):
    """Every random choice takes a seed from the run config (DESIGN §1)."""
    offenders = []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        owner = ast.unparse(f.value)
        if owner in ("np.random", "numpy.random") and f.attr in LEGACY_NP_RANDOM:
            if f.attr != "default_rng" or not (node.args or node.keywords):
                offenders.append(f"{node.lineno}: {ast.unparse(node)}")
        if owner == "random" and f.attr in STDLIB_RANDOM:
            offenders.append(f"{node.lineno}: {ast.unparse(node)}")
        if owner == "random" and f.attr == "Random" and not (node.args or node.keywords):
            offenders.append(f"{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
