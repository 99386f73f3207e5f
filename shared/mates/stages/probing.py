"""The oracle: probe stage k's checkpoint with documents of stage k+1's pool
(`probing.method`), and record what it measured."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mates.artifacts import read_json, write_jsonl
from mates.context import Context
from mates.flops import exact_probe_flops, first_order_probe_flops, reference_gradient_flops
from mates.probe import ExactOracle, FirstOrderOracle
from mates.stages.training import LM
from mates.stats import spearman

log = logging.getLogger(__name__)


def probe_documents(ctx: Context, k: int) -> tuple[list[str], list[int], list[torch.Tensor]]:
    """The documents stage k's checkpoint is probed with, drawn from stage k+1's pool:
    their IDs, corpus indices and token IDs (EOS-terminated, at most seq+1 long)."""
    pool_ids = read_json(ctx.paths.pool(k + 1))["ids"]
    n = min(ctx.cfg.probing.num_probes, len(pool_ids))
    rng = np.random.default_rng([ctx.cfg.seed, k, 13])
    chosen = sorted(rng.choice(len(pool_ids), size=n, replace=False).tolist())
    ids = [pool_ids[j] for j in chosen]
    docs = [ctx.corpus.index_of(d) for d in ids]
    T = ctx.cfg.train.seq_tokens
    tokens = [
        torch.from_numpy(np.append(ctx.corpus.token_ids(i)[:T], ctx.eos).astype(np.int64))
        for i in docs
    ]
    return ids, docs, tokens


def probe(ctx: Context, lm: LM, k: int) -> None:
    """Oracle influences of probe documents drawn from stage k+1's pool (`probing.method`)."""
    trainer = lm.load_end_of(k)
    pc, tc = ctx.cfg.probing, ctx.cfg.train
    ids, docs, tokens = probe_documents(ctx, k)
    n = len(ids)
    kw: dict[str, Any] = dict(
        lr=pc.lr or trainer.current_lr,
        grad_clip=tc.grad_clip,
        precision=tc.precision if pc.precision == "train" else "fp32",
        eval_batch_sequences=tc.eval_batch_sequences,
    )
    model, opt = trainer.model, trainer.optimizer
    t0 = time.perf_counter()
    exact_idx: list[int] = []
    if pc.method == "exact":
        oracle: ExactOracle | FirstOrderOracle = ExactOracle(model, opt, ctx.reference, **kw)
        values = _each(ctx, oracle, tokens, f"stage {k} probe")
        exact_idx = list(range(n))
        exact_vals = values
    else:
        oracle = FirstOrderOracle(
            model,
            opt,
            ctx.reference,
            shift=pc.method == "first_order_shift",
            batch=pc.method == "first_order_batch",
            **kw,
        )
        values = _each(ctx, oracle, tokens, f"stage {k} probe (first-order)")
        if pc.method == "hybrid":
            m = min(pc.exact_subset, n)
            exact_idx = sorted(
                np.random.default_rng([ctx.cfg.seed, k, 17])
                .choice(n, size=m, replace=False)
                .tolist()
            )
            exact = ExactOracle(model, opt, ctx.reference, **kw)
            exact_vals = _each(
                ctx, exact, [tokens[j] for j in exact_idx], f"stage {k} probe (exact)"
            )
    seconds = time.perf_counter() - t0
    rows = []
    exact_of = dict(zip(exact_idx, exact_vals, strict=True)) if exact_idx else {}
    for j, (d, i, v) in enumerate(zip(ids, docs, values, strict=True)):
        row = {"id": d, "influence": float(v), "domain": ctx.corpus.domain(i)}
        if pc.method == "hybrid" and j in exact_of:
            row["exact"] = float(exact_of[j])
        rows.append(row)
    write_jsonl(ctx.paths.probes(k), rows)
    ctx.record_flops(k, "probe", probe_flops(ctx, lm, tokens, exact_idx))
    summary = _summary(rows, oracle)
    summary.update(
        method=pc.method,
        seconds=round(seconds, 3),
        precision=kw["precision"],
        shared_effect=float(oracle.shared_effect()),
        probes_per_s=round(n / seconds, 3) if seconds > 0 else None,
    )
    if pc.method == "hybrid":
        fo = np.array([values[j] for j in exact_idx])
        rho = spearman(fo, np.array(exact_vals))
        summary.update(
            exact_subset=len(exact_idx),
            first_order_spearman=round(float(rho), 4),
            min_spearman=pc.min_spearman,
        )
        if not rho >= pc.min_spearman:  # also catches NaN
            msg = (
                f"stage {k}: Spearman(first-order, exact) = {rho:.3f} on {len(exact_idx)} "
                f"probes is below probing.min_spearman = {pc.min_spearman}: the first-order "
                "approximation does not hold here (try a lower probing.lr or method exact)"
            )
            log.warning(msg)
            ctx.event(k, "first_order_disagrees", message=msg, spearman=float(rho))
    ctx.manifest.update_metrics(k, probes=summary)


def probe_flops(ctx: Context, lm: LM, tokens: list[torch.Tensor], exact_idx: list[int]) -> float:
    cost, ref = lm.cost(), ctx.reference
    ref_tokens, ref_scored = int(ref.lengths.sum()), ref.scored_tokens
    total = lm.eval_flops(ref)  # the base reference loss
    if ctx.cfg.probing.method != "exact":
        total += reference_gradient_flops(cost, ref_tokens, ref_scored)
        total += sum(first_order_probe_flops(cost, len(t) - 1) for t in tokens)
    total += sum(
        exact_probe_flops(cost, len(tokens[j]) - 1, ref_tokens, ref_scored) for j in exact_idx
    )
    return total


def _each(ctx: Context, oracle, tokens: list[torch.Tensor], desc: str) -> list[float]:
    out = []
    for t in tqdm(tokens, desc=desc, disable=not ctx.progress, leave=False):
        out.append(float(oracle.influence(t)))
        ctx.check_cancel()
    return out


def _summary(rows: list[dict], oracle) -> dict:
    vals = np.array([r["influence"] for r in rows])
    by_domain: dict[str, list[float]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"] or "-", []).append(r["influence"])
    return {
        "count": len(rows),
        "mean": float(vals.mean()),
        "std": float(vals.std()),
        "base_reference_loss": oracle.base_loss,
        "clipped_fraction": oracle.clipped / len(rows),
        "mean_by_domain": {d: round(float(np.mean(v)), 6) for d, v in sorted(by_domain.items())},
        "count_by_domain": {d: len(v) for d, v in sorted(by_domain.items())},
    }
