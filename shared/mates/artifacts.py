"""The one place that builds artifact paths, and atomic writes.

Every artifact lives under `<run dir>/stage-<k>/` and becomes visible by an
atomic rename, so a crash never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mates.errors import ArtifactError


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run's artifacts. Nothing else in the code base builds them."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def cancel(self) -> Path:
        """Marker file: its presence asks a running run to stop at the next step."""
        return self.root / "cancel"

    @property
    def tokenized(self) -> Path:
        return self.root / "tokenized"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def stage(self, k: int) -> Path:
        if k < 0:
            raise ArtifactError(f"stage index must be >= 0, got {k}")
        return self.root / f"stage-{k}"

    def selection(self, k: int) -> Path:
        """Manifest of the documents stage k trains on."""
        return self.stage(k) / "selection.json"

    def pool(self, k: int) -> Path:
        """IDs of stage k's candidate pool."""
        return self.stage(k) / "pool.json"

    def checkpoint(self, k: int) -> Path:
        """End-of-stage (or latest mid-stage) training state of stage k."""
        return self.stage(k) / "checkpoint"

    def probes(self, k: int) -> Path:
        """Oracle influences measured on stage k's checkpoint."""
        return self.stage(k) / "probes.jsonl"

    def influence_model(self, k: int) -> Path:
        """Data influence model fitted to stage k's probes."""
        return self.stage(k) / "influence-model"

    def scores(self, k: int) -> Path:
        """Scores of stage k+1's pool by stage k's influence model."""
        return self.stage(k) / "scores.jsonl"

    def score_shard(self, k: int, shard: int) -> Path:
        """One shard of `scores(k)`; shards are merged into it once all exist."""
        if shard < 0:
            raise ArtifactError(f"shard index must be >= 0, got {shard}")
        return self.stage(k) / "scores" / f"shard-{shard:05d}.jsonl"

    def export(self) -> Path:
        """Final LM in `save_pretrained` form."""
        return self.root / "final-model"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it over `final`.

    Works for files and directories. On error the temporary is removed and
    `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if target.is_file():
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(target, final)
        _fsync_dir(final.parent)
    except OSError as e:
        raise ArtifactError(f"could not write {final}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
            n += 1
    return n


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"artifact {path} is not valid JSON: {e}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rows.append(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError:
                    raise ArtifactError(f"{path}:{lineno}: not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise ArtifactError(f"{path}:{lineno}: not valid JSON: {e}") from None
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist") from None
    return rows


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one line (logs such as metrics and events; not a completion artifact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
