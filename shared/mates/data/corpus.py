"""Corpus reading and tokenization into memory-mapped arrays.

A corpus is rows `{"id": str, "text": str, ...}` in one or many shards (JSONL, gzip or
zstd JSONL, Parquet, saved Hugging Face datasets: mates.data.sources). It is read
once, validated (unique non-empty string IDs, non-empty UTF-8 text), tokenized,
and stored as flat binary arrays with offsets, so that a pool of millions of
documents is never held in Python lists of text or tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from mates.artifacts import atomic_path, read_json, write_json
from mates.data.chunking import chunk_texts
from mates.data.sources import PoolSpec, expand_pool, raw_rows
from mates.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_BATCH_ROWS = 1000


@dataclass
class Row:
    id: str
    text: str
    domain: str | None


@dataclass
class ReadStats:
    rows: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1


class BadRow(DataError):
    """A corpus row that cannot be used; `reason` is the message without the location."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def _validate(obj: Any, where: str, id_field: str, text_field: str) -> tuple[str, str]:
    if isinstance(obj, BadRow):
        raise obj
    if not isinstance(obj, dict):
        raise BadRow(where, "row must be a JSON object")
    doc_id, text = obj.get(id_field), obj.get(text_field)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise BadRow(where, f"missing or non-string `{id_field}`")
    if not isinstance(text, str):
        raise BadRow(where, f"missing or non-string `{text_field}` (id {doc_id!r})")
    if not text.strip():
        raise BadRow(where, f"empty `{text_field}` (id {doc_id!r})")
    return doc_id, text


def iter_corpus(
    path: PoolSpec,
    *,
    id_field: str = "id",
    text_field: str = "text",
    domain_field: str | None = "domain",
    on_bad_row: str = "error",
    stats: ReadStats | None = None,
) -> Iterator[Row]:
    """Stream validated rows of every shard `path` names (mates.data.sources), in order.
    Bad rows raise (naming file and line) or are skipped and counted; an ID seen in an
    earlier row, of this shard or another, is a bad row naming both places."""
    shards = expand_pool(path)
    stats = stats if stats is not None else ReadStats()
    seen: dict[str, tuple[int, int]] = {}  # id -> (shard, row): where it was first
    for s, shard in enumerate(shards):
        for n, (where, obj, bad) in enumerate(raw_rows(shard)):
            try:
                if bad:
                    raise BadRow(where, bad)
                doc_id, text = _validate(obj, where, id_field, text_field)
                if doc_id in seen:
                    first = _where_of(shards, *seen[doc_id])
                    raise BadRow(where, f"duplicate id {doc_id!r} (first at {first})")
            except BadRow as e:
                if on_bad_row == "error":
                    raise
                stats.skip(e.reason.split(" (")[0].split(" '")[0])
                log.warning("skipping bad row: %s", e)
                continue
            seen[doc_id] = (s, n)
            stats.rows += 1
            domain = obj.get(domain_field) if domain_field else None
            yield Row(doc_id, text, domain if isinstance(domain, str) else None)


def _where_of(shards: list[Path], shard: int, row: int) -> str:
    """`<file>:<n>` of the row-th row read from a shard (its line, for JSONL)."""
    for where, _, _ in islice(raw_rows(shards[shard]), row, row + 1):
        return where
    return str(shards[shard])


class TokenizedCorpus:
    """Memory-mapped tokens and texts of a corpus, addressed by document ID or index."""

    FILES = ("tokens.bin", "token_offsets.npy", "text.bin", "text_offsets.npy", "ids.json")

    def __init__(self, root: Path):
        root = Path(root)
        self.root = root
        self.meta = read_json(root / "meta.json")
        dtype = np.dtype(self.meta["token_dtype"])
        self.tokens = np.memmap(root / "tokens.bin", dtype=dtype, mode="r")
        self.token_offsets = np.load(root / "token_offsets.npy", mmap_mode="r")
        self._text = np.memmap(root / "text.bin", dtype=np.uint8, mode="r")
        self.text_offsets = np.load(root / "text_offsets.npy", mmap_mode="r")
        self.ids: list[str] = json.loads((root / "ids.json").read_text(encoding="utf-8"))
        self.domains = np.load(root / "domains.npy")
        self.domain_names: list[str] = self.meta["domain_names"]
        self._index = {doc_id: i for i, doc_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, doc_id: str) -> int:
        try:
            return self._index[doc_id]
        except KeyError:
            raise DataError(f"unknown document id {doc_id!r}") from None

    def indices_of(self, doc_ids: list[str]) -> np.ndarray:
        return np.fromiter((self.index_of(d) for d in doc_ids), dtype=np.int64, count=len(doc_ids))

    def token_ids(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.token_offsets[i] : self.token_offsets[i + 1]])

    def text(self, i: int) -> str:
        raw = self._text[self.text_offsets[i] : self.text_offsets[i + 1]]
        return bytes(raw).decode("utf-8")

    def num_tokens(self, indices: np.ndarray | None = None) -> np.ndarray:
        lengths = np.diff(np.asarray(self.token_offsets))
        return lengths if indices is None else lengths[indices]

    def domain(self, i: int) -> str | None:
        code = int(self.domains[i])
        return self.domain_names[code] if code >= 0 else None


def _write_arrays(
    out: Path,
    rows: Iterator[Row],
    tokenizer,
    token_dtype: np.dtype,
    chunk_tokens: int | None = None,
) -> dict:
    """Tokenize rows in batches and append to flat binary files; returns counts.

    With `chunk_tokens`, a document longer than that is stored as its chunks, with IDs
    `<id>#<n>` (`mates.data.chunking`)."""
    ids: list[str] = []
    seen: dict[str, str] = {}  # unit ID -> the corpus row it came from
    domain_codes: list[int] = []
    domain_names: dict[str, int] = {}
    tok_off, txt_off = [0], [0]
    chunked = 0

    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust core
    if chunk_tokens is not None and backend is None:
        raise ConfigError(
            "`data.chunk_tokens` needs a fast (Rust) tokenizer, which measures pieces "
            f"of a document by its token offsets; {type(tokenizer).__name__} is not one"
        )

    def encode(texts: Sequence[str]) -> list[list[int]]:
        # the same IDs as tokenizer(texts)["input_ids"], without its per-call Python overhead
        if backend is not None:
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def encode_with_starts(texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        assert backend is not None  # chunking was refused above without one
        return [
            (e.ids, [a for a, _ in e.offsets])
            for e in backend.encode_batch(list(texts), add_special_tokens=False)
        ]

    with open(out / "tokens.bin", "wb") as ftok, open(out / "text.bin", "wb") as ftxt:
        batch: list[Row] = []

        def emit(unit_id: str, row: Row, text: str, toks: list[int]) -> None:
            if unit_id in seen:
                raise DataError(
                    f"corpus unit id {unit_id!r} (from document {row.id!r}) is also the id "
                    f"of {'document' if seen[unit_id] == unit_id else 'a chunk of'} "
                    f"{seen[unit_id]!r}: chunks are named `<id>#<n>`; rename one of them"
                )
            seen[unit_id] = row.id
            raw = text.encode("utf-8")
            ftxt.write(raw)
            ftok.write(np.asarray(toks, dtype=token_dtype).tobytes())
            tok_off.append(tok_off[-1] + len(toks))
            txt_off.append(txt_off[-1] + len(raw))
            ids.append(unit_id)
            code = (
                -1 if row.domain is None else domain_names.setdefault(row.domain, len(domain_names))
            )
            domain_codes.append(code)

        def flush() -> None:
            nonlocal chunked
            if chunk_tokens is None:
                for r, toks in zip(batch, encode([r.text for r in batch]), strict=True):
                    emit(r.id, r, r.text, toks)
                batch.clear()
                return
            encoded = encode_with_starts([r.text for r in batch])
            long = [j for j, (toks, _) in enumerate(encoded) if len(toks) > chunk_tokens]
            parts = dict(
                zip(
                    long,
                    chunk_texts(
                        [batch[j].text for j in long],
                        [encoded[j][1] for j in long],
                        encode_with_starts,
                        chunk_tokens,
                    ),
                    strict=True,
                )
            )
            chunked += len(long)
            for j, (r, (toks, _)) in enumerate(zip(batch, encoded, strict=True)):
                if j not in parts:
                    emit(r.id, r, r.text, toks)
                for n, (text, part) in enumerate(parts.get(j, ())):
                    emit(f"{r.id}#{n}", r, text, part)
            batch.clear()

        for row in rows:
            batch.append(row)
            if len(batch) >= _BATCH_ROWS:
                flush()
        if batch:
            flush()
    np.save(out / "token_offsets.npy", np.asarray(tok_off, dtype=np.int64))
    np.save(out / "text_offsets.npy", np.asarray(txt_off, dtype=np.int64))
    np.save(out / "domains.npy", np.asarray(domain_codes, dtype=np.int16))
    (out / "ids.json").write_text(json.dumps(ids), encoding="utf-8")
    return {
        "num_docs": len(ids),
        "num_tokens": tok_off[-1],
        "domain_names": list(domain_names),
        "chunk_tokens": chunk_tokens,
        "chunked_documents": chunked,
        "source_documents": len(set(seen.values())),
    }


def tokenize_corpus(
    path: PoolSpec,
    tokenizer,
    out: Path,
    *,
    id_field: str = "id",
    text_field: str = "text",
    domain_field: str | None = "domain",
    on_bad_row: str = "error",
    chunk_tokens: int | None = None,
) -> TokenizedCorpus:
    """Tokenize a corpus file once into `out` (atomically); reuse it when already there.

    With `chunk_tokens`, documents longer than that many tokens are stored as chunks."""
    out = Path(out)
    if (out / "meta.json").is_file():
        return TokenizedCorpus(out)
    vocab = len(tokenizer)
    token_dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    stats = ReadStats()
    rows = iter_corpus(
        path,
        id_field=id_field,
        text_field=text_field,
        domain_field=domain_field,
        on_bad_row=on_bad_row,
        stats=stats,
    )
    with atomic_path(out) as tmp:
        tmp.mkdir()
        counts = _write_arrays(tmp, rows, tokenizer, token_dtype, chunk_tokens)
        if counts["num_docs"] == 0:
            raise DataError(f"corpus {path} has no usable documents (the pool is empty)")
        meta = {
            "source": [str(p) for p in expand_pool(path)],
            "token_dtype": token_dtype.name,
            "vocab_size": vocab,
            "skipped_rows": stats.skipped,
            "skip_reasons": stats.skip_reasons,
            **counts,
        }
        write_json(tmp / "meta.json", meta)
    log.info(
        "tokenized %d docs (%d tokens, %d rows skipped) from %s",
        counts["num_docs"],
        counts["num_tokens"],
        stats.skipped,
        path,
    )
    return TokenizedCorpus(out)
