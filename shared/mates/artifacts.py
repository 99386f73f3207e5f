"""The one place that builds artifact paths, and atomic writes.

Every artifact lives under `<run dir>/stage-<k>/` and becomes visible by an
atomic rename, so a crash never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mates.errors import ArtifactError, MatesError


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
    def lock(self) -> Path:
        """Locked (flock) by the process executing the run; the OS releases it if that dies."""
        return self.root / "run.lock"

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

    def cooldown(self, k: int) -> Path:
        """Held-out evaluation of stage k's checkpoint after a learning-rate cooldown branch."""
        return self.stage(k) / "cooldown.json"

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

    def eval_dir(self) -> Path:
        """Downstream evaluation (`mates eval`): results, exported stages, built tasks."""
        return self.root / "eval"

    def eval_results(self, k: int | None) -> Path:
        """lm-eval results of the final model (k None) or of stage k's checkpoint."""
        return self.eval_dir() / ("final.json" if k is None else f"stage-{k}.json")

    def eval_model(self, k: int) -> Path:
        """Stage k's checkpoint in `save_pretrained` form, for lm-eval."""
        return self.eval_dir() / "models" / f"stage-{k}"


TMP_SUFFIX = ".tmp"  # a temporary of `atomic_path`; one left by a killed process is garbage


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder of a directory, to disk before it is renamed."""
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync_tree(Path(folder) / name)
            _fsync_dir(Path(folder))
    elif path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _os_reason(e: BaseException) -> str | None:
    """Why the OS refused a write ("No space left on device"), from the exception's chain.

    torch.save raises a RuntimeError whose context is the OSError; safetensors' Rust
    writer only names the errno in its message.
    """
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        m = re.search(r"os error (\d+)", str(seen))
        if m:
            return os.strerror(int(m.group(1)))
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success fsync it and rename it over `final`.

    Works for files and directories. On error the temporary is removed and `final` is
    untouched; an error of the file system raises ArtifactError naming `final` and the
    reason ("File too large", "Permission denied").
    """
    final = Path(final)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent))
        target = tmp / final.name
        yield target
        _fsync_tree(target)
        if final.is_dir() and not final.is_symlink():
            # Move the old directory aside in one rename: deleting it in place could, if the
            # process died midway, leave a partial directory under the final name.
            os.replace(final, tmp / "replaced")
        os.replace(target, final)
        _fsync_dir(final.parent)
    except Exception as e:
        reason = None if isinstance(e, MatesError) else _os_reason(e)
        if reason is None:
            raise
        raise ArtifactError(f"could not write {final}: {reason}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> int:
    """Delete what `atomic_path` left behind in processes that were killed; returns the count.

    Only safe while no other process writes under `root`.
    """
    stale = [p for p in Path(root).rglob(f".*{TMP_SUFFIX}") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


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


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, value, None) for each non-blank line of a JSONL file.

    A line that is not UTF-8 JSON gives (line number, None, reason), so that the
    caller can raise naming `path:line` or skip it and count.
    """
    with open(path, "rb") as fh:
        yield from parse_jsonl_lines(fh)


def parse_jsonl_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, Any, str | None]]:
    """`iter_jsonl` over lines of bytes from anywhere (a gzip or zstd stream)."""
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield lineno, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield lineno, None, f"not valid UTF-8 ({e.reason})"
        except json.JSONDecodeError as e:
            yield lineno, None, f"not valid JSON ({e.msg})"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        for lineno, obj, bad in iter_jsonl(path):
            if bad:
                raise ArtifactError(f"{path}:{lineno}: {bad}")
            rows.append(obj)
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist") from None
    return rows


def _cut_torn_tail(fh) -> bool:
    """Truncate an open log after its last newline; True if a torn last line was cut."""
    pos = fh.seek(0, os.SEEK_END)
    if pos == 0:
        return False
    fh.seek(pos - 1)
    if fh.read(1) == b"\n":
        return False
    while pos > 0:
        step = min(1 << 16, pos)
        pos -= step
        fh.seek(pos)
        chunk = fh.read(step)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            pos += cut + 1
            break
    fh.truncate(pos)
    return True


def repair_log(path: Path) -> bool:
    """Cut a last line that a crash or a full disk left half-written; True if one was."""
    try:
        with open(path, "rb+") as fh:
            return _cut_torn_tail(fh)
    except FileNotFoundError:
        return False


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one line (logs such as metrics and events; not a completion artifact).

    A torn last line left by an earlier crash is cut first, so the log stays readable.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as fh:
            _cut_torn_tail(fh)
            fh.write((json.dumps(row) + "\n").encode("utf-8"))
    except OSError as e:
        raise ArtifactError(f"could not append to {path}: {e.strerror or e}") from e
