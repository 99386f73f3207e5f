"""Architecture rules as tests: one place builds artifact paths, one place prints, no unseeded RNG."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mates

PACKAGE = Path(mates.__file__).parent
SERVICES = PACKAGE.parent.parent / "services"  # the services import the library; same rules
MODULES = sorted(PACKAGE.rglob("*.py")) + sorted(SERVICES.rglob("*.py"))
LEGACY_NP_RANDOM = {
    "seed",
    "rand",
    "randn",
    "randint",
    "random",
    "choice",
    "permutation",
    "shuffle",
    "normal",
    "uniform",
    "gumbel",
    "default_rng",
}
STDLIB_RANDOM = {
    "random",
    "randint",
    "choice",
    "choices",
    "shuffle",
    "sample",
    "uniform",
    "gauss",
    "seed",
}


# Names of the files and folders under a run dir, as `RunPaths` builds them (a string
# constant, or an f-string part, equal to one of these is a path being built by hand).
RUN_NAMES = {
    "stage-",
    "run.json",
    "metrics.jsonl",
    "events.jsonl",
    "pool.json",
    "selection.json",
    "probes.jsonl",
    "scores.jsonl",
    "influence-model",
    "final-model",
    "checkpoint",
    "tokenized",
    "tokenizer",
    "cancel",
}


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
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docs
                and node.value in RUN_NAMES
            ):
                offenders.append(f"{_rel(path)}:{node.lineno}: {node.value!r}")
    assert offenders == [], "artifact paths must come from mates.artifacts.RunPaths"


def test_only_the_cli_prints():
    offenders = []
    for path in MODULES:
        if path.name == "cli.py":
            continue
        for node in ast.walk(_tree(path)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
            ):
                offenders.append(f"{_rel(path)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("path", MODULES, ids=[_rel(p) for p in MODULES])
def test_no_unseeded_randomness(path):
    """Every random choice takes a seed from the run config (docs/design.md §1)."""
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


# --------------------------------------------------------------------------- layers
#
# The layers point one way: the science library imports no service; each service (api,
# scorer, worker, trainer, and the loadtest tool) imports the library, `services.common`
# and itself only; `services.common` imports no service. `services/cli.py`, the command
# line that starts every service, is the one module that may name them all.

ROOT = PACKAGE.parent.parent
LIBRARY = sorted(PACKAGE.rglob("*.py"))
SERVICE_MODULES = sorted(SERVICES.rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent if path.is_relative_to(PACKAGE) else ROOT)
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[tuple[int, str]]:
    """Every absolute module an import statement of the file names, at any depth (inside
    functions and `if TYPE_CHECKING:` too), with its line; `from a import b` names `a`
    and `a.b`."""
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _layer(path: Path) -> str:
    """`api`, `scorer`, `worker`, `trainer`, `common`, or a top-level module's name."""
    return path.relative_to(SERVICES).with_suffix("").parts[0]


def test_the_library_imports_no_service():
    offenders = [
        f"{_rel(p)}:{line}: {name}"
        for p in LIBRARY
        for line, name in _imported(p)
        if name == "services" or name.startswith("services.")
    ]
    assert offenders == [], "the science library must work without the services"


@pytest.mark.parametrize("path", SERVICE_MODULES, ids=[_rel(p) for p in SERVICE_MODULES])
def test_a_service_imports_only_the_library_common_and_itself(path):
    layer = _layer(path)
    if layer in ("cli", "__init__"):
        return  # the launcher of every service; the package's docstring
    allowed = {"common", layer}
    offenders = [
        f"{line}: {name}"
        for line, name in _imported(path)
        if name.startswith("services.") and name.split(".")[1] not in allowed
    ]
    assert offenders == [], f"{_rel(path)} ({layer}) may import only mates and services.common"


def test_the_api_imports_no_worker_or_scorer_module():
    api = [p for p in SERVICE_MODULES if _layer(p) == "api"]
    assert len(api) > 5
    offenders = [
        f"{_rel(p)}:{line}: {name}"
        for p in api
        for line, name in _imported(p)
        if name.startswith(("services.worker", "services.scorer", "services.trainer"))
    ]
    assert offenders == []


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph` (module -> modules it imports): its strongly connected
    components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return circles


def test_there_is_no_import_circle():
    """Between the modules of the library and the services, counting every import (lazy
    ones inside functions and type-only ones too)."""
    modules = {_module_name(p): p for p in LIBRARY + SERVICE_MODULES}
    graph = {
        name: {m for _, m in _imported(p) if m in modules and m != name}
        for name, p in modules.items()
    }
    assert len(graph) > 60 and graph["mates.run"]  # the graph is really there
    assert _circles(graph) == []


def test_an_import_circle_is_found(tmp_path):
    """The check above on known circles (a lazy import closing one), so that it cannot
    pass by finding nothing."""
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    assert [m for _, m in _imported(tmp_path / "b.py")] == ["a"]
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": set()}
    assert sorted(_circles(graph)) == [["a", "b"], ["d", "e"]]


def test_the_services_commands_come_through_the_entry_point():
    """`mates runs|serve|loadtest` are the services' (services/cli.py), registered under
    the `mates.commands` entry-point group; the library's CLI names no service."""
    from importlib.metadata import entry_points

    assert "services.cli" in {ep.value for ep in entry_points(group="mates.commands")}
    from mates.cli import _parser

    commands = _parser()._subparsers._group_actions[0].choices
    assert {"runs", "serve", "loadtest"} <= set(commands)


MAX_LINES = 400


def test_every_source_file_is_under_400_lines():
    """A file per idea: a module that outgrows this is split by concern."""
    long = {
        str(p.relative_to(PACKAGE.parent.parent)): n
        for p in MODULES
        if (n := len(p.read_text(encoding="utf-8").splitlines())) >= MAX_LINES
    }
    assert not long, f"source files of {MAX_LINES} lines or more: {long}"


STATUS_WORDS = {
    "pending",
    "queued",
    "running",
    "cancelling",
    "cancelled",
    "failed",
    "done",
    "training",
    "probing",
    "fitting",
    "scoring",
    "selecting",
}
VOCABULARY = PACKAGE / "manifest.py"  # RunStatus and StageState


def _vocabulary_literals(tree: ast.AST) -> list[int]:
    """Lines that compare a run's `status` or a stage's `state` with a string literal, or
    spell a tuple, list or set of status words: the words belong to the enums."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            keyed = any(
                isinstance(s, ast.Subscript)
                and isinstance(s.slice, ast.Constant)
                and s.slice.value in ("status", "state")
                for s in sides
            )
            words = [s for s in sides if isinstance(s, ast.Constant) and s.value in STATUS_WORDS]
            if keyed and words:
                lines.append(node.lineno)
        elif isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) >= 2:
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            if all(v in STATUS_WORDS for v in values) and {"done", "failed"} & set(values):
                lines.append(node.lineno)
    return lines


def test_status_words_are_spelled_only_by_their_enums():
    found = {
        str(p.relative_to(PACKAGE.parent.parent)): lines
        for p in MODULES
        if p != VOCABULARY
        and (lines := _vocabulary_literals(ast.parse(p.read_text(encoding="utf-8"))))
    }
    assert not found, f"use mates.manifest.RunStatus / StageState instead of literals: {found}"


def test_a_status_literal_is_found():
    src = 'if run["status"] == "done":\n    pass\nFINAL = ("done", "failed", "cancelled")\n'
    assert _vocabulary_literals(ast.parse(src)) == [1, 3]
