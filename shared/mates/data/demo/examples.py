"""LAMBADA-style examples cut from news articles, and the split of the articles into the
reference, held-out and pool parts."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from typing import Any

from mates.data.demo.common import ABBREVIATIONS, CONTEXT_WORDS, TOPICS, Article, DemoDataError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- LAMBADA examples

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9]|\s*$)")


def sentence_spans(body: str) -> list[tuple[int, int]]:
    """(start, end) character spans of sentences; abbreviations and initials do not end one."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(body):
        before = body[start : m.start()].split()
        last = before[-1].lower().strip("\"'(") if before else ""
        if last in ABBREVIATIONS or len(last) == 1:
            continue
        spans.append((start, m.end()))
        start = m.end() + len(body[m.end() :]) - len(body[m.end() :].lstrip())
    return spans


def final_word(body: str, span: tuple[int, int]) -> tuple[int, str] | None:
    """(offset, word) of a sentence's last word if it is alphabetic and has ≥ 3 letters."""
    tokens = body[span[0] : span[1]].split()
    if len(tokens) < 2:
        return None
    token = tokens[-1]
    word = token.rstrip(".!?\"')]")
    if len(word) < 3 or not (word.isascii() and word.isalpha()) or word.lower() in ABBREVIATIONS:
        return None
    if tokens[-2].strip(".,;:!?\"'()").lower() == word.lower():
        return None
    return span[1] - len(token), word


def _example_for(
    body: str, spans: list[tuple[int, int]], j: int, rng: random.Random
) -> dict[str, str] | None:
    """Context from a random sentence start giving 40–90 words, ending before sentence j's word."""
    found = final_word(body, spans[j])
    if found is None:
        return None
    offset, word = found
    lo, hi = CONTEXT_WORDS
    contexts = []
    for i in range(j, -1, -1):
        context = body[spans[i][0] : offset].rstrip()
        n = len(context.split())
        if n > hi:
            break
        if n >= lo:
            contexts.append(context)
    if not contexts:
        return None
    return {"context": rng.choice(contexts), "continuation": " " + word}


def make_example(body: str, rng: random.Random) -> dict[str, str] | None:
    """One LAMBADA-style example from a random suitable sentence of `body`, or None."""
    spans = sentence_spans(body)
    order = list(range(len(spans)))
    rng.shuffle(order)
    for j in order:
        example = _example_for(body, spans, j, rng)
        if example is not None:
            return example
    return None


def _allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split `total` across strata proportionally to `sizes` (largest remainder)."""
    n = sum(sizes.values())
    exact = {k: total * v / n for k, v in sizes.items()}
    alloc = {k: int(x) for k, x in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (alloc[k] - exact[k], k))
    for k in by_remainder[: total - sum(alloc.values())]:
        alloc[k] += 1
    return alloc


def split_news(
    articles: Sequence[Article], n_ref: int, n_held: int, rng: random.Random
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[Article]]:
    """Stratified by topic: reference rows, held-out rows, and the articles left for the pool."""
    by_topic = {t: [a for a in articles if a.topic == t] for t in TOPICS}
    want_ref = _allocate(n_ref, {t: len(v) for t, v in by_topic.items()})
    want_held = _allocate(n_held, {t: len(v) for t, v in by_topic.items()})
    ref, held, rest = [], [], []
    for topic, arts in by_topic.items():
        arts = list(arts)
        rng.shuffle(arts)
        for art in arts:
            ex = None
            if want_ref[topic] + want_held[topic] > 0:
                ex = make_example(art.body, rng)
            if ex is None:
                rest.append(art)
            elif want_ref[topic] > 0:
                want_ref[topic] -= 1
                ref.append({"id": f"ref-{art.id}", **ex})
            else:
                want_held[topic] -= 1
                held.append({"id": f"heldout-{art.id}", **ex})
    _check_filled(want_ref, want_held)
    return sorted(ref, key=by_id), sorted(held, key=by_id), sorted(rest, key=by_id)


def by_id(row: Any) -> str:
    """Sort key for rows (dicts) and documents/articles (attributes)."""
    return row["id"] if isinstance(row, dict) else row.id


def _check_filled(want_ref: dict[str, int], want_held: dict[str, int]) -> None:
    """Raise if some topic had too few usable articles for its share of the sets."""
    short = {t: want_ref[t] + want_held[t] for t in TOPICS if want_ref[t] + want_held[t] > 0}
    if short:
        raise DemoDataError(
            f"not enough usable news articles for the reference/held-out sets; short by {short}"
        )
