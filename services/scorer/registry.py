"""Model versions in the artifact store: `<run_id>/<stage>` → an influence-model directory.

Every run is a directory `<root>/<dir>/` holding its manifest; a run is known by the
`run_id` inside the manifest, not by the directory's name. A version of a run is
a stage whose influence model is complete (its `meta.json` exists; models are
written by an atomic rename, so a half-written one is never seen).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from mates.artifacts import RunPaths, read_json
from mates.errors import ArtifactError
from services.common.contracts import RUN_ID_PATTERN
from services.scorer.errors import BadModelName, ModelNotFound, ModelNotReady

log = logging.getLogger(__name__)

LATEST = "latest"
MODEL_META = "meta.json"


@dataclass(frozen=True)
class Version:
    run_id: str
    stage: int
    path: Path

    @property
    def name(self) -> str:
        return f"{self.run_id}/{self.stage}"


@dataclass(frozen=True)
class _Run:
    run_id: str
    paths: RunPaths
    num_stages: int


def parse_model(model: str) -> tuple[str, int | None]:
    """`<run_id>/<stage>` → (run_id, stage); `<run_id>/latest` → (run_id, None)."""
    run_id, sep, stage = model.rpartition("/")
    if not sep or not run_id or not stage:
        raise BadModelName(f"model must be '<run_id>/<stage>' or '<run_id>/latest', got {model!r}")
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise BadModelName(
            f"model {model!r}: {run_id!r} is not a run ID (letters, digits, "
            "'.', '_' and '-', starting with a letter or digit)"
        )
    if stage == LATEST:
        return run_id, None
    if not stage.isascii() or not stage.isdigit():
        raise BadModelName(
            f"model {model!r}: stage must be a non-negative integer or 'latest', got {stage!r}"
        )
    return run_id, int(stage)


class ModelRegistry:
    """Finds runs under `root` by scanning; rescans on a miss so new runs appear."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def scan(self) -> dict[str, _Run]:
        runs: dict[str, _Run] = {}
        children = sorted(self.root.iterdir()) if self.root.is_dir() else []
        for child in children:
            paths = RunPaths(child)
            if not paths.manifest.is_file():
                continue
            try:
                data = read_json(paths.manifest)
                run = _Run(str(data["run_id"]), paths, int(data["config"]["stages"]["num_stages"]))
            except (ArtifactError, KeyError, TypeError, ValueError) as e:
                log.warning(
                    "skipping %s: unreadable run manifest (%s: %s)", child, type(e).__name__, e
                )
                continue
            if run.run_id in runs:
                log.warning(
                    "run %s is in both %s and %s; using the first",
                    run.run_id,
                    runs[run.run_id].paths.root,
                    child,
                )
                continue
            runs[run.run_id] = run
        with self._lock:
            self._runs = runs
        return runs

    def _run(self, run_id: str) -> _Run:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None or not run.paths.manifest.is_file():
            run = self.scan().get(run_id)
        if run is None:
            raise ModelNotFound(f"unknown run {run_id!r} in the artifact store {self.root}")
        return run

    @staticmethod
    def _stages(run: _Run) -> list[int]:
        return [
            k
            for k in range(run.num_stages)
            if (run.paths.influence_model(k) / MODEL_META).is_file()
        ]

    def resolve(self, model: str) -> Version:
        """The version a `model` string names; raises BadModelName, ModelNotFound, ModelNotReady."""
        run_id, stage = parse_model(model)
        run = self._run(run_id)
        stages = self._stages(run)
        if not stages:
            raise ModelNotReady(
                f"run {run_id!r} has no trained influence model yet; retry once stage 0 is fitted"
            )
        if stage is None:
            stage = stages[-1]
        elif stage not in stages:
            raise ModelNotFound(
                f"run {run_id!r} has no influence model for stage {stage} "
                f"(stages with a model: {', '.join(map(str, stages))})"
            )
        return Version(run_id, stage, run.paths.influence_model(stage))

    def versions(self) -> list[Version]:
        """Every complete model version in the store, by run ID then stage."""
        runs = self.scan()
        return [
            Version(run.run_id, k, run.paths.influence_model(k))
            for run_id, run in sorted(runs.items())
            for k in self._stages(run)
        ]

    @staticmethod
    def meta(version: Version) -> dict:
        return read_json(version.path / MODEL_META)
