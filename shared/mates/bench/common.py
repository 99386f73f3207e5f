"""What every section of the bench shares: input sizes, timing, and the demo-size run it
measures on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mates.config import PRESETS, load_config
from mates.data.packing import PackedStream
from mates.run import Run

log = logging.getLogger(__name__)


@dataclass
class Sizes:
    probes: int
    reference: int
    scorer_docs: int
    trainer_steps: int
    rounds: int


QUICK = Sizes(probes=16, reference=256, scorer_docs=600, trainer_steps=6, rounds=3)
FULL = Sizes(probes=48, reference=256, scorer_docs=2000, trainer_steps=16, rounds=4)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- set-up


def demo_run(work: Path, sizes: Sizes, device: str, progress: bool, reference: str) -> Run:
    """The demo preset on freshly built demo data, with a reference set of `sizes.reference`
    examples: the demo's own (LAMBADA-style: short contexts, continuation-only loss), or
    'text': that many full-length sequences of news text, loss on every token."""
    from mates.data.demo import build_demo
    from mates.data.reference import load_reference

    data = work / "data" / "demo"
    build_demo(data, seed=0, reference_examples=sizes.reference, progress=False)
    # the scorer benchmark measures a transformer encoder (MiniLM), whatever the demo scores
    # with: batching, precision and compilation are what it compares, and a bag of n-grams
    # has none of them
    cfg = load_config(
        PRESETS / "demo.yaml", [f"device={device}", "influence.encoder=minilm"], base_dir=work
    )
    run = Run(cfg, work / "run", progress=progress)
    run.prepare()
    if reference == "text":
        T = cfg.train.seq_tokens
        news = [
            i for i in range(len(run.corpus)) if (run.corpus.domain(i) or "").startswith("news")
        ]
        text, tokens = [], 0
        for i in news:
            if tokens > (T + 1) * sizes.reference:
                break
            text.append(run.corpus.text(i))
            tokens += int(run.corpus.num_tokens(np.array([i]))[0])
        path = work / "reference-text.txt"
        path.write_text("\n\n".join(text), encoding="utf-8")
        run.ctx.reference = load_reference(path, run.tokenizer, T, sizes.reference)
    return run


def trained(run: Run, steps: int) -> tuple[Any, PackedStream]:
    """A demo-size LM a few steps into training, so AdamW has moments (the probes' state)."""
    trainer = run._build_trainer()
    ids = np.random.default_rng([run.cfg.seed, 5]).permutation(len(run.corpus))[:2000]
    stream = PackedStream(run.corpus, ids, run.cfg.train.seq_tokens, run.eos, seed=run.cfg.seed)
    for _ in range(steps):
        trainer.train_step(stream)
    return trainer, stream


def probe_docs(run: Run, n: int) -> list[torch.Tensor]:
    rng = np.random.default_rng([run.cfg.seed, 9])
    idx = rng.choice(len(run.corpus), size=n, replace=False)
    T = run.cfg.train.seq_tokens
    return [
        torch.from_numpy(np.append(run.corpus.token_ids(int(i))[:T], run.eos).astype(np.int64))
        for i in idx
    ]
