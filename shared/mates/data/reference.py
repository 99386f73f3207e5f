"""Reference and held-out task sets as padded token batches with loss masks.

JSONL rows `{"context": str, "continuation": str}` count the continuation's
tokens only (LAMBADA style). A `.txt` file is plain text: it is cut into
sequences and every token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mates.artifacts import iter_jsonl
from mates.errors import DataError

IGNORE = -100


@dataclass
class ReferenceSet:
    """Right-padded sequences sorted by length; `labels` is IGNORE outside the scored tokens."""

    input_ids: torch.Tensor  # (N, T) long
    labels: torch.Tensor  # (N, T) long, already shifted: labels[:, t] is the target of t
    lengths: torch.Tensor  # (N,) tokens per row before padding
    source: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def scored_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device) -> ReferenceSet:
        return ReferenceSet(
            self.input_ids.to(device), self.labels.to(device), self.lengths, self.source
        )


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for lineno, obj, bad in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if bad:
            raise DataError(f"{where}: {bad}")
        if not isinstance(obj, dict):
            raise DataError(f"{where}: row must be a JSON object")
        ctx, cont = obj.get("context"), obj.get("continuation")
        if not isinstance(ctx, str):
            raise DataError(f"{where}: missing or non-string `context`")
        if not isinstance(cont, str) or not cont.strip():
            raise DataError(f"{where}: missing or empty `continuation`")
        pairs.append((ctx, cont))
    return pairs


def _pack_rows(rows: list[tuple[list[int], int]], source: str) -> ReferenceSet:
    """rows: (tokens, number of trailing tokens to score). Sorted by length, right-padded."""
    rows = sorted(rows, key=lambda r: len(r[0]))
    width = max(len(t) for t, _ in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (toks, n_scored) in enumerate(rows):
        t = torch.tensor(toks, dtype=torch.long)
        ids[i, : len(toks)] = t
        # position p predicts token p+1; score the last n_scored tokens
        start = len(toks) - n_scored
        labels[i, start - 1 : len(toks) - 1] = t[start:]
    lengths = torch.tensor([len(t) for t, _ in rows])
    return ReferenceSet(ids, labels, lengths, source)


def load_reference(
    path: Path, tokenizer, seq_tokens: int, max_examples: int | None = None
) -> ReferenceSet:
    """Load a reference/held-out set; contexts are cut from the left to fit `seq_tokens`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference set {path} does not exist")
    if path.suffix == ".txt":
        return _load_plain(path, tokenizer, seq_tokens, max_examples)
    pairs = _read_pairs(path)[:max_examples]
    if not pairs:
        raise DataError(f"reference set {path} has no examples")
    rows = []
    for ctx, cont in pairs:
        c_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        t_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if len(t_ids) >= seq_tokens:
            raise DataError(f"{path}: a continuation is longer than {seq_tokens} tokens")
        keep = seq_tokens - len(t_ids)
        c_ids = c_ids[-keep:] if c_ids else [tokenizer.eos_token_id]
        rows.append((c_ids + t_ids, len(t_ids)))
    return _pack_rows(rows, str(path))


def _load_plain(path: Path, tokenizer, seq_tokens: int, max_examples: int | None) -> ReferenceSet:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8") from None
    toks = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [toks[i : i + seq_tokens] for i in range(0, len(toks), seq_tokens)]
    chunks = [c for c in chunks if len(c) >= 2][:max_examples]
    if not chunks:
        raise DataError(f"reference set {path} has no text")
    return _pack_rows([(c, len(c) - 1) for c in chunks], str(path))
