"""Corpora as they come: `data.pool` is a file, a glob or a list of them, each JSONL
(`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), Parquet, or a Hugging Face dataset saved with
`save_to_disk` (a folder). Shards are read in a stable order: the list's order, and a
glob's matches sorted by path.

Every row comes with where it is (`<file>:<n>`: the line of a JSONL file, the row of a
Parquet file or a dataset), so a bad row or a duplicate ID is named in its file. A file that cannot be
read in its format is a DataError naming the file (and the line, where there is one).
"""

from __future__ import annotations

import glob
import gzip
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mates.artifacts import parse_jsonl_lines
from mates.errors import DataError

_BATCH_ROWS = 1000
_GLOB_MAGIC = frozenset("*?[")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")

PoolSpec = str | Path | Sequence[str | Path]


def is_glob(entry: str | Path) -> bool:
    return bool(_GLOB_MAGIC & set(str(entry)))


def is_dataset_dir(path: Path) -> bool:
    """A folder written by `save_to_disk` of a `datasets.Dataset` (or of a DatasetDict,
    which is refused when read: name one split's folder)."""
    one = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    return path.is_dir() and (one or (path / "dataset_dict.json").is_file())


def expand_pool(spec: PoolSpec) -> list[Path]:
    """The shards `spec` names, in reading order; an entry that names nothing is an error
    naming it."""
    entries = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not entries:
        raise DataError("the corpus is an empty list of files")
    shards: list[Path] = []
    for entry in entries:
        if is_glob(entry):
            matches = sorted(glob.glob(str(entry), recursive=True))
            if not matches:
                raise DataError(f"the corpus glob {str(entry)!r} matches no file")
            found = [Path(m) for m in matches]
        else:
            found = [Path(entry)]
        for path in found:
            if path.is_dir() and not is_dataset_dir(path):
                raise DataError(f"{path} is a folder but not a saved Hugging Face dataset")
            if not (path.is_file() or path.is_dir()):
                raise DataError(f"corpus file {path} does not exist")
            if path not in shards:
                shards.append(path)
    return shards


def shard_format(path: Path) -> str:
    name = path.name.lower()
    if is_dataset_dir(path):
        return "dataset"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith((".gz",)):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return "jsonl"


def raw_rows(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(where, row, None) for each row of one shard; (where, None, reason) for a line that
    is not UTF-8 JSON, so the caller can raise or skip and count."""
    kind = shard_format(path)
    if kind == "parquet":
        yield from _parquet_rows(path)
    elif kind == "dataset":
        yield from _dataset_rows(path)
    else:
        yield from _jsonl_rows(path, kind)


def _open_text_bytes(path: Path, kind: str) -> io.BufferedIOBase:
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "zstd":
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 (closed with the reader)
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")  # noqa: SIM115


def _jsonl_rows(path: Path, kind: str) -> Iterator[tuple[str, Any, str | None]]:
    lineno = 0
    try:
        with _open_text_bytes(path, kind) as fh:
            for lineno, obj, bad in parse_jsonl_lines(fh):
                yield f"{path}:{lineno}", obj, bad
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip, a bad zstd frame
        at = f" after line {lineno}" if lineno else ""
        raise DataError(f"{path}: not a readable {kind} file{at} ({e})") from None
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            at = f" after line {lineno}" if lineno else ""
            raise DataError(f"{path}: not a readable zstd file{at} ({e})") from None
        raise


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
        for obj in batch.to_pylist():
            n += 1
            yield f"{path}:{n}", obj, None


def _dataset_rows(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a saved Hugging Face dataset; reading it needs the `datasets` package "
            "(pip install 'mates[datasets]')"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(
            f"{path} holds several splits ({', '.join(ds)}); name one split's folder instead"
        )
    n = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            n += 1
            yield f"{path}:{n}", dict(zip(columns, values, strict=True)), None
