"""Cutting documents into training units no longer than a token limit.

A document longer than the limit is split at the coarsest boundary that works:
paragraphs (a blank line), then lines, then sentences, then words; a single word
longer than the limit (a URL, a run of symbols) is halved by characters. Neighbouring
pieces are packed greedily up to the limit, so chunks are as long as the boundaries
allow. Each chunk is stripped of surrounding whitespace and re-tokenized on its own:
its stored tokens are exactly what the tokenizer gives for its stored text, which is
what the oracle, the influence model's encoder and the trainer all read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# Separators stay with the piece before them, so the pieces of a text add up to it.
_LEVELS = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"\n\s*"),  # lines
    re.compile(r"[.!?][\"')\]]*\s+"),  # sentences
    re.compile(r"\s+"),  # words
)

Counter = Callable[[Sequence[str]], list[int]]


def _pieces(text: str, pattern: re.Pattern) -> list[str]:
    out, start = [], 0
    for m in pattern.finditer(text):
        if m.end() > start:
            out.append(text[start : m.end()])
            start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def _split(text: str, count: Counter, limit: int, level: int) -> list[str]:
    """Pieces of `text`, each at most `limit` tokens (before stripping)."""
    if level == len(_LEVELS):
        if len(text) <= 1:
            return [text]
        mid = len(text) // 2
        halves = [text[:mid], text[mid:]]
        return [c for h, n in zip(halves, count(halves), strict=True)
                for c in ([h] if n <= limit else _split(h, count, limit, level))]
    pieces = _pieces(text, _LEVELS[level])
    if len(pieces) <= 1:
        return _split(text, count, limit, level + 1)
    chunks: list[str] = []
    cur, cur_n = "", 0
    for piece, n in zip(pieces, count(pieces), strict=True):
        if n > limit:
            if cur:
                chunks.append(cur)
            chunks.extend(_split(piece, count, limit, level + 1))
            cur, cur_n = "", 0
        elif cur and cur_n + n > limit:
            chunks.append(cur)
            cur, cur_n = piece, n
        else:
            cur, cur_n = cur + piece, cur_n + n
    if cur:
        chunks.append(cur)
    # token counts are not exactly additive across a boundary: check, and cut finer where needed
    out: list[str] = []
    for chunk, n in zip(chunks, count(chunks), strict=True):
        out.extend([chunk] if n <= limit else _split(chunk, count, limit, level + 1))
    return out


def chunk_text(text: str, count: Counter, limit: int) -> list[str]:
    """`text` cut into stripped, non-empty chunks of at most `limit` tokens each, in order.

    `count(texts)` gives each text's token count. A text within the limit comes back whole
    (stripped)."""
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    parts = [c.strip() for c in _split(text, count, limit, 0)]
    parts = [c for c in parts if c]
    # stripping can only remove tokens, but a tokenizer may merge differently: check again
    out: list[str] = []
    for chunk, n in zip(parts, count(parts), strict=True):
        out.extend([chunk] if n <= limit else [c.strip() for c in _split(chunk, count, limit, len(_LEVELS))
                                               if c.strip()])
    return out
