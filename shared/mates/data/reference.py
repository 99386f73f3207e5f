"""Reference and held-out task sets as padded token batches with loss masks.

JSONL rows `{"context": str, "continuation": str}` count the continuation's
tokens only (LAMBADA style). A `.txt` file is plain text: it is cut into
sequences and every token counts. A full-text held-out set (`kind: text`) is JSONL
rows `{"text": str}`: each document is cut into sequences that overlap by one token,
so that every token of it after an EOS is scored exactly once, and each row remembers
its document (`doc_index`) so that losses can be summed per document.
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
    doc_index: torch.Tensor | None = None  # (N,) the document each row was cut from

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def docs(self) -> torch.Tensor:
        """(N,) document of each row: one document per row unless cut from longer ones."""
        return torch.arange(len(self)) if self.doc_index is None else self.doc_index

    @property
    def num_docs(self) -> int:
        return int(self.docs.max()) + 1 if len(self) else 0

    @property
    def scored_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device) -> ReferenceSet:
        return ReferenceSet(
            self.input_ids.to(device),
            self.labels.to(device),
            self.lengths,
            self.source,
            self.doc_index,
        )


def _existing(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    return path


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
            raise DataError(
                f"{where}: missing or non-string `context` (a reference of whole "
                "documents needs `data.reference_kind: text`)"
            )
        if not isinstance(cont, str) or not cont.strip():
            raise DataError(f"{where}: missing or empty `continuation`")
        pairs.append((ctx, cont))
    return pairs


def read_cloze_pairs(path: Path) -> list[tuple[str, str]]:
    """(context, continuation) of each row of a cloze JSONL file, checked."""
    return _read_pairs(_existing(path, "cloze set"))


def pack_rows(
    rows: list[tuple[list[int], int]], source: str, docs: list[int] | None = None
) -> ReferenceSet:
    """rows: (tokens, number of trailing tokens to score). Sorted by length, right-padded."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    rows = [rows[i] for i in order]
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
    doc_index = None if docs is None else torch.tensor([docs[i] for i in order], dtype=torch.long)
    return ReferenceSet(ids, labels, lengths, source, doc_index)


def load_reference(
    path: Path, tokenizer, seq_tokens: int, max_examples: int | None = None, kind: str = "auto"
) -> ReferenceSet:
    """Load a reference/held-out set; cloze contexts are cut from the left to fit `seq_tokens`.

    `kind` (`data.reference_kind`): 'cloze' scores each continuation, 'text' every token of
    whole documents (`load_text_documents`); 'auto' is text for a .txt file, else cloze.
    """
    if kind == "text":
        return load_text_documents(path, tokenizer, seq_tokens, max_examples, what="reference set")
    path = _existing(path, "reference set")
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
    return pack_rows(rows, str(path))


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
    return pack_rows([(c, len(c) - 1) for c in chunks], str(path))


def _read_texts(path: Path) -> list[str]:
    texts = []
    for lineno, obj, bad in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if bad:
            raise DataError(f"{where}: {bad}")
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: a full-text row needs a non-empty string `text`")
        texts.append(text)
    return texts


def load_text_documents(
    path: Path,
    tokenizer,
    seq_tokens: int,
    max_documents: int | None = None,
    what: str = "held-out set",
) -> ReferenceSet:
    """A full-text set from JSONL `{"text"}` rows: every token of every document is scored.

    A document is EOS + its tokens, cut into rows of `seq_tokens` that overlap by one
    token, so each token is predicted exactly once with as much context as a row allows.
    """
    path = _existing(path, what)
    if path.suffix == ".txt":
        return _load_plain(path, tokenizer, seq_tokens, max_documents)
    texts = _read_texts(path)[:max_documents]
    if not texts:
        raise DataError(f"{what} {path} has no documents")
    rows, docs = [], []
    eos = tokenizer.eos_token_id
    for d, text in enumerate(texts):
        toks = [eos] + tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(toks) - 1, seq_tokens - 1):
            chunk = toks[start : start + seq_tokens]
            rows.append((chunk, len(chunk) - 1))
            docs.append(d)
    return pack_rows(rows, str(path), docs)


def load_heldout(spec, tokenizer, seq_tokens: int) -> ReferenceSet:
    """One configured held-out set (`data.heldout_sets` entry or `data.heldout`)."""
    if spec.kind == "text":
        return load_text_documents(spec.path, tokenizer, seq_tokens, spec.max_documents)
    return load_reference(spec.path, tokenizer, seq_tokens, spec.max_documents)


def reference_texts(path: Path, max_examples: int | None = None, kind: str = "auto") -> list[str]:
    """The reference set as raw text (context and continuation joined), for text-only methods."""
    path = _existing(path, "reference set")
    if kind == "text" and path.suffix != ".txt":
        return _read_texts(path)[:max_examples]
    if path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8") from None
    return [f"{c} {t}" for c, t in _read_pairs(path)[:max_examples]]
