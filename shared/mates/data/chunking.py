"""Cutting documents into training units no longer than a token limit.

A document longer than the limit is split at the coarsest boundary that works:
paragraphs (a blank line), then lines, then sentences, then words; a run with no
boundary at all (a URL, a line of symbols) is cut between tokens. Neighbouring pieces
are packed greedily up to the limit, so chunks are as long as the boundaries allow.
Pieces are measured with the document's own token offsets (one tokenizer pass); each
chunk is then stripped of surrounding whitespace and tokenized on its own, and a chunk
that comes out longer (a word at the start of a chunk can take more tokens than it did
after a space) is cut again with its own offsets. A chunk's stored tokens are exactly
what the tokenizer gives for its stored text, which is what the oracle, the influence
model's encoder and the trainer all read.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Sequence

from mates.errors import DataError

# Separators stay with the piece before them, so the pieces of a text add up to it.
_LEVELS = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"\n\s*"),  # lines
    re.compile(r"[.!?][\"')\]]*\s+"),  # sentences
    re.compile(r"\s+"),  # words
)
_ROUNDS = 4  # re-cuts of a chunk that re-tokenizes longer than the limit

# texts -> for each, (token IDs, each token's first character)
Encoder = Callable[[Sequence[str]], list[tuple[list[int], list[int]]]]


def chunk_spans(text: str, starts: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """Character spans that cut `text` into pieces of at most `limit` tokens, where
    `starts` holds the first character of each of the text's tokens (in order)."""
    first = list(starts)

    def count(a: int, b: int) -> int:
        return bisect_left(first, b) - bisect_left(first, a)

    def split(a: int, b: int, level: int) -> list[tuple[int, int]]:
        if count(a, b) <= limit:
            return [(a, b)]
        if level == len(_LEVELS):  # no boundary left: cut between tokens
            cuts = [a] + [
                first[j] for j in range(bisect_left(first, a) + limit, bisect_left(first, b), limit)
            ]
            return [(x, y) for x, y in zip(cuts, [*cuts[1:], b], strict=True) if y > x]
        ends = [m.end() for m in _LEVELS[level].finditer(text, a, b) if a < m.end() < b]
        if not ends:
            return split(a, b, level + 1)
        spans: list[tuple[int, int]] = []
        cur = None  # the span being packed
        for x, y in zip([a, *ends], [*ends, b], strict=True):
            if count(x, y) > limit:
                spans += ([cur] if cur else []) + split(x, y, level + 1)
                cur = None
            elif cur and count(cur[0], y) > limit:
                spans.append(cur)
                cur = (x, y)
            else:
                cur = (cur[0], y) if cur else (x, y)
        return spans + ([cur] if cur else [])

    return split(0, len(text), 0)


def _stripped(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [c for c in (text[a:b].strip() for a, b in spans) if c]


def chunk_texts(
    texts: Sequence[str], starts: Sequence[Sequence[int]], encode: Encoder, limit: int
) -> list[list[tuple[str, list[int]]]]:
    """Each text cut into stripped, non-empty chunks of at most `limit` tokens, in order,
    each with its own token IDs; `starts[i]` holds the first character of each token of
    `texts[i]`. A text within the limit comes back whole (stripped). Every round of
    tokenizing goes through `encode` as one batch."""
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    # per text: [chunk text, its token IDs once they are known to fit]
    chunks: list[list[list]] = [
        [[c, None] for c in _stripped(t, chunk_spans(t, s, limit))]
        for t, s in zip(texts, starts, strict=True)
    ]
    for _ in range(_ROUNDS):
        todo = [
            (d, i) for d, cs in enumerate(chunks) for i, (_, ids) in enumerate(cs) if ids is None
        ]
        if not todo:
            return [[(c, ids) for c, ids in cs] for cs in chunks]
        recut: dict[tuple[int, int], list[list]] = {}
        for (d, i), (ids, offsets) in zip(
            todo, encode([chunks[d][i][0] for d, i in todo]), strict=True
        ):
            chunk = chunks[d][i][0]
            if len(ids) <= limit:
                chunks[d][i][1] = ids
            else:  # cut again, measured with this chunk's own tokens
                recut[d, i] = [
                    [c, None] for c in _stripped(chunk, chunk_spans(chunk, offsets, limit))
                ]
        for d in {d for d, _ in recut}:
            chunks[d] = [x for i, item in enumerate(chunks[d]) for x in recut.get((d, i), [item])]
    d = next(d for d, cs in enumerate(chunks) if any(ids is None for _, ids in cs))
    raise DataError(
        f"could not cut a document into chunks of at most {limit} tokens "
        f"(it starts {texts[d][:60]!r}); raise `data.chunk_tokens`"
    )
