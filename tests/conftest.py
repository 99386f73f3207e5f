"""Shared fixtures: tiny models, a small demo data set and one tiny end-to-end run.

The expensive things (demo data, the tiny run of `configs/tiny.yaml`) are built
once per session. Torch is pinned to one thread: on a 2-core machine the tiny
models are fastest that way, and a second process on the box (a demo run, a
service) does not make every test ten times slower through oversubscription.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TINY_CONFIG  # noqa: E402

from mates.config import RunConfig, load_config  # noqa: E402

torch.set_num_threads(1)


# A deliberately small demo pool: enough documents for three stages of
# `pool_docs: 200` with 20% kept, built in well under a second.
DEMO_POOL_NEWS_ARTICLES = 100


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A small byte-level BPE (the `train-bpe` path) trained on a few sentences."""
    from mates.data.tokenizer import train_bpe

    words = (
        "the market shares rose sharply after the report while the minister said "
        "players won the match and the film star thanked fans for the award"
    ).split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=12)) for _ in range(200)]
    return train_bpe(texts, 300, tmp_path_factory.mktemp("bpe") / "tokenizer")


# --------------------------------------------------------------------------- demo data + runs


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory) -> Path:
    """A directory holding `data/demo/{pool,reference,heldout}.jsonl` (the presets' paths)."""
    from mates.data.demo import build_demo

    base = tmp_path_factory.mktemp("demo-base")
    build_demo(
        base / "data" / "demo", seed=0, pool_news_articles=DEMO_POOL_NEWS_ARTICLES, progress=False
    )
    return base


@pytest.fixture(scope="session")
def tiny_config_factory(demo_base):
    """`configs/tiny.yaml` with its data paths resolved into the session's demo data."""

    def make(*overrides: str) -> RunConfig:
        return load_config(TINY_CONFIG, list(overrides), base_dir=demo_base)

    return make


@pytest.fixture(scope="session")
def tiny_run(demo_base, tiny_config_factory):
    """One uninterrupted run of `configs/tiny.yaml`, shared read-only by many tests.

    It lives at `<base>/compare/mates` so that `compare()` on `<base>/compare` finds the
    MATES arm already done and only runs the random arm.
    """
    from mates.run import Run

    cfg = tiny_config_factory()
    out = demo_base / "compare" / "mates"
    manifest = Run(cfg, out, progress=False).execute()
    return {"dir": out, "cfg": cfg, "manifest": manifest.data}
