"""Scoring: the naive path against length-bucketed batches, eager and compiled."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from mates.bench.common import Sizes, sync, timed
from mates.run import Run

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- scorer


def mixed_lengths(texts: list[str], seed: int) -> list[str]:
    """Each text cut after a random number of its paragraphs (blank-line separated), uniform
    from one to all: real text at natural cut points, from a headline to the whole document.

    The demo's documents are long (95% of them reach a 128-token window whole), so as they
    are they leave length bucketing nothing to remove; this is the mixed-length set the
    scorer's target is stated on.
    """
    rng = np.random.default_rng([seed, 4])
    out = []
    for text in texts:
        paragraphs = text.split("\n\n")
        out.append("\n\n".join(paragraphs[: int(rng.integers(1, len(paragraphs) + 1))]))
    return out


def _score_arms(
    arms: dict[str, Callable[[list[str]], np.ndarray]], texts: list[str], rounds: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Seconds and scores of each arm over `texts`, the arms taking turns on each chunk."""
    t = dict.fromkeys(arms, 0.0)
    out = {arm: np.empty(len(texts)) for arm in arms}
    for chunk in np.array_split(np.arange(len(texts)), rounds):
        part = [texts[i] for i in chunk]
        for arm, fn in arms.items():
            v, sec = timed(partial(fn, part))
            out[arm][chunk] = v
            t[arm] += sec
    return t, out


def bench_scorer(run: Run, sizes: Sizes) -> dict[str, Any]:
    """Naive against bucketed scoring (eager and compiled) on two sets of the same demo
    documents: cut to mixed lengths (`mixed_lengths`; the top-level keys), and whole
    (`at_cap`: nearly all of them fill the window, so only the precision can help)."""
    from mates.baselines import naive_predict
    from mates.influence import InfluenceModel, InfluenceScorer, fast_predict

    ic = run.cfg.influence
    encoder, tok = run.new_encoder()
    torch.manual_seed(run.cfg.seed)
    scorer = InfluenceScorer(InfluenceModel(encoder), tok, ic.max_tokens, run.device)
    rng = np.random.default_rng([run.cfg.seed, 3])
    idx = rng.choice(len(run.corpus), size=min(sizes.scorer_docs, len(run.corpus)), replace=False)
    whole = [run.corpus.text(int(i)) for i in idx]
    mixed = mixed_lengths(whole, run.cfg.seed)
    bs = 64
    # the same model compiled (what MATES_SCORER_COMPILE=1 gives the scorer service)
    compiled = InfluenceScorer(scorer.model, tok, ic.max_tokens, run.device, compile=True)
    naive_predict(scorer, whole[:8], bs)  # warm-up of the eager arms
    fast_predict(scorer, whole[:8], bs)
    # the compile, on two batch shapes (the second makes the shapes dynamic): timed apart
    _, compile_s = timed(
        lambda: (fast_predict(compiled, whole[:8], bs), fast_predict(compiled, mixed[8:13], bs))
    )
    arms = {
        "naive": lambda p: naive_predict(scorer, p, bs),
        "fast": lambda p: fast_predict(scorer, p, bs),
        "compiled": lambda p: fast_predict(compiled, p, bs),
    }

    def measured(texts: list[str]) -> dict[str, Any]:
        if run.device.type == "cuda":
            # untimed pass: on a GPU the first batch of each new shape pays for kernel
            # selection, and the bucketed arm meets many shapes on the mixed set (the first
            # H200 run timed it at 0.4x of naive that way, 2.1x on whole documents)
            _score_arms(arms, texts, 1)
        t, out = _score_arms(arms, texts, sizes.rounds)
        tokens = np.array([len(x) for x in scorer.tokenize(texts)])
        return {
            "tokens_mean": float(tokens.mean()),
            "tokens_p10_p50_p90": [int(v) for v in np.percentile(tokens, [10, 50, 90])],
            "at_window": float(np.mean(tokens >= ic.max_tokens)),
            "naive_docs_per_s": len(texts) / t["naive"],
            "docs_per_s": len(texts) / t["fast"],
            "speedup": t["naive"] / t["fast"],
            "max_abs_diff": float(np.max(np.abs(out["naive"] - out["fast"]))),
            "compiled_docs_per_s": len(texts) / t["compiled"],
            "compiled_speedup": t["naive"] / t["compiled"],
            "compiled_max_abs_diff": float(np.max(np.abs(out["naive"] - out["compiled"]))),
        }

    return {
        "docs": len(whole),
        "encoder": ic.encoder,
        "max_tokens": ic.max_tokens,
        "batch_size": bs,
        "precision": scorer.resolved_precision(),
        "set": "mixed lengths (paragraph cuts)",
        **measured(mixed),
        "compile_s": compile_s,
        "at_cap": {"set": "whole documents", **measured(whole)},
    }


def _matmuls(a: torch.Tensor, b: torch.Tensor, reps: int, device: torch.device) -> None:
    for _ in range(reps):
        a @ b
    sync(device)


def matmul_gflops(device: torch.device, n: int | None = None, reps: int = 10) -> dict[str, float]:
    """GFLOP/s of an n x n matrix product in fp32 and bf16: the ceiling that bf16 can lift a
    model-bound path by on this machine (about 2.3x on AVX-512 BF16, more with AMX). n
    defaults to 1024 on a CPU, 8192 on a GPU (smaller products only time the launches)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        sync(device)
        _, sec = timed(partial(_matmuls, a, b, reps, device))
        out[name] = round(2 * n**3 * reps / sec / 1e9, 1)
    return out
