"""Pools and selections: stage k's pool drawn from the corpus, its selection written by
the method (the influence model's scores, or random and the baselines that need none),
and the quality gate that lets a poor influence model fall back."""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import torch
from safetensors.torch import load_file

from mates.artifacts import read_json, read_jsonl, write_json, write_jsonl
from mates.context import Context
from mates.data.reference import pack_rows, reference_texts
from mates.errors import ConfigError, StageFailed
from mates.lm import build_lm, row_losses
from mates.selection import (
    fill_budget,
    join_scores,
    label_order,
    label_selection,
    select_indices,
    selection_order,
    target_label_mask,
)
from mates.stages.training import LM

log = logging.getLogger(__name__)


# -- pools -----------------------------------------------------------------------


def selected_before(ctx: Context, k: int) -> set[int]:
    seen: set[int] = set()
    for j in range(k):
        seen.update(ctx.corpus.indices_of(read_json(ctx.paths.selection(j))["ids"]).tolist())
    return seen


def write_pool(ctx: Context, k: int) -> None:
    st = ctx.cfg.stages
    if st.token_budgets:
        idx = token_pool(ctx, k)
    elif st.pool_mode == "disjoint":  # sizes checked up front in prepare()
        n = st.pool_docs
        idx = ctx.order[k * n : (k + 1) * n]
    else:
        used = selected_before(ctx, k)
        idx = np.array([i for i in ctx.order if int(i) not in used][: st.pool_docs], dtype=np.int64)
    if len(idx) == 0:
        raise StageFailed(f"stage {k}: no unused documents left for the pool")
    write_json(ctx.paths.pool(k), {"stage": k, "ids": [ctx.corpus.ids[i] for i in idx]})


def token_pool(ctx: Context, k: int) -> np.ndarray:
    """Stage k's pool under token budgets: the next units of the run's corpus order until
    they hold `pool_need(k)` tokens; consecutive disjoint spans, or the units not yet
    trained on (`stages.pool_mode`)."""
    if ctx.cfg.stages.pool_mode == "disjoint":
        ends = np.cumsum(ctx.corpus.num_tokens(ctx.order) + 1)
        start = end = 0
        for j in range(k + 1):
            base = int(ends[start - 1]) if start else 0
            end = min(int(np.searchsorted(ends, base + ctx.pool_need(j))) + 1, len(ends))
            if j < k:
                start = end
        return ctx.order[start:end]
    used = selected_before(ctx, k)
    candidates = np.array([i for i in ctx.order if int(i) not in used], dtype=np.int64)
    if len(candidates) == 0:
        return candidates
    idx, _ = fill_budget(
        np.arange(len(candidates)), ctx.corpus.num_tokens(candidates), ctx.pool_need(k)
    )
    return candidates[idx]


# -- selections ------------------------------------------------------------------------


def select(
    ctx: Context,
    k: int,
    scores: list[dict] | None,
    method: str,
    sampler: str | None = None,
    temperature: float | None = None,
    extra: dict | None = None,
    chosen: np.ndarray | None = None,
    order: np.ndarray | None = None,
    standardize: bool = False,
    off_target: np.ndarray | None = None,
) -> None:
    """Write selection(k) from pool(k); scores are joined to the pool by document ID.

    `method` names the selection method, `sampler` how scores become a selection
    (gumbel, topk or random; default: the method itself); `chosen` skips sampling, and
    `order` (token budgets) gives the order in which documents are kept. Under token
    budgets a selection keeps documents in that order until they fill one epoch of the
    stage's steps; otherwise `selection.ratio` of the pool's documents.
    `standardize` z-scores the pool's scores first, so that τ means the same in every
    stage whatever the spread of the influence model's predictions. `off_target` (a mask
    over the pool) counts the kept documents it marks as `filled_at_random`.
    """
    s, corpus = ctx.cfg.selection, ctx.corpus
    pool_ids = read_json(ctx.paths.pool(k))["ids"]
    arr = join_scores(pool_ids, scores) if scores is not None else None
    if standardize and arr is not None:
        spread = float(arr.std())
        extra = {**(extra or {}), "score_mean": float(arr.mean()), "score_std": spread}
        arr = (arr - arr.mean()) / spread if spread > 0 else np.zeros_like(arr)
    sampler = sampler or method
    temperature = s.temperature if temperature is None else temperature
    seed = selection_seed(ctx, k)
    pool_idx = corpus.indices_of(pool_ids)
    budget: dict = {}
    if chosen is None and ctx.cfg.stages.token_budgets:
        if order is None:
            order = selection_order(
                arr, len(pool_ids), method=sampler, temperature=temperature, seed=seed
            )
        chosen, filled = fill_budget(order, corpus.num_tokens(pool_idx), ctx.stage_need(k))
        budget = {"budget_tokens": ctx.stage_need(k), "filled": filled}
        if not filled:
            log.warning(
                "stage %d: the pool's %d documents do not fill the stage's %d tokens; "
                "the stage repeats some of them",
                k,
                len(pool_ids),
                ctx.stage_need(k),
            )
    elif chosen is None:
        chosen = select_indices(
            arr, len(pool_ids), ratio=s.ratio, method=sampler, temperature=temperature, seed=seed
        )
    if off_target is not None:
        extra = {**(extra or {}), "filled_at_random": int(off_target[chosen].sum())}
    ids = [pool_ids[i] for i in chosen]
    idx = corpus.indices_of(ids)
    tc = ctx.cfg.train
    manifest = {
        "stage": k,
        "method": method,
        "sampler": sampler,
        "seed": seed,
        "ratio": None if budget else s.ratio,
        **budget,
        "temperature": temperature if sampler == "gumbel" else None,
        "model_version": model_version(ctx, k - 1)
        if scores is not None and s.model_based
        else None,
        "pool_size": len(pool_ids),
        "selected": len(ids),
        "selected_tokens": int(corpus.num_tokens(idx).sum()),
        "pool_tokens": int(corpus.num_tokens(pool_idx).sum()),
        "stage_tokens": ctx.stage_steps(k) * tc.batch_sequences * tc.seq_tokens,
        "domains": _domain_counts(ctx, idx),
        "pool_domains": _domain_counts(ctx, pool_idx),
        **(extra or {}),
        "ids": ids,
    }
    write_json(ctx.paths.selection(k), manifest)
    ctx.manifest.update_metrics(
        k, selection={key: v for key, v in manifest.items() if key != "ids"}
    )


def selection_seed(ctx: Context, k: int) -> list[int]:
    """Stage 0's random selection takes the run's seed in every arm (it is shared);
    later ones `selection.seed` where set (an A/A arm)."""
    s = ctx.cfg.selection
    return [ctx.cfg.seed if k == 0 or s.seed is None else s.seed, k, 11]


def model_version(ctx: Context, k: int) -> str:
    """The version of the influence model that scored stage k+1's pool ('static':
    stage 0's, whose meta it copied)."""
    meta = ctx.paths.influence_model(k) / "meta.json"
    version = read_json(meta).get("version") if meta.is_file() else None
    return version or f"{ctx.manifest.run_id}/{k}"


def select_with_model(ctx: Context, k: int) -> None:
    """Selection(k+1) from stage k's merged scores, or by `selection.fallback` where the
    quality gate refuses the model."""
    s = ctx.cfg.selection
    gate = quality_gate(ctx, k)
    if gate["passed"] or s.fallback == "none":
        select(
            ctx,
            k + 1,
            scores=read_jsonl(ctx.paths.scores(k)),
            method=s.method,
            sampler=s.score_sampler,
            standardize=True,
            extra={"gate": gate},
        )
    else:
        select(
            ctx,
            k + 1,
            scores=None,
            method=s.method,
            sampler=s.fallback,
            extra={"gate": gate, "fallback": s.fallback},
        )


def select_without_model(ctx: Context, lm: LM, k: int) -> None:
    """Selection(k) by a method that fits no influence model (random and the baselines)."""
    s = ctx.cfg.selection
    if s.method == "random":
        select(ctx, k, scores=None, method="random")
        return
    pool_ids = read_json(ctx.paths.pool(k))["ids"]
    idx = ctx.corpus.indices_of(pool_ids)
    t0 = time.perf_counter()
    if s.method == "label":
        mask = label_mask(ctx)[idx]
        extra = {"target_labels": s.target_labels, "pool_matching": int(mask.sum())}
        if ctx.cfg.stages.token_budgets:
            select(
                ctx,
                k,
                scores=None,
                method="label",
                sampler="label",
                order=label_order(mask, seed=selection_seed(ctx, k)),
                extra=extra,
                off_target=~mask,
            )
            return
        chosen, filled = label_selection(mask, ratio=s.ratio, seed=selection_seed(ctx, k))
        select(
            ctx,
            k,
            scores=None,
            method="label",
            sampler="label",
            chosen=chosen,
            extra={**extra, "filled_at_random": filled},
        )
        return
    if s.method == "dsir":
        from mates.dsir import dsir_scores

        ref = reference_texts(
            ctx.cfg.data.reference,
            ctx.cfg.probing.max_reference_examples,
            ctx.cfg.data.reference_kind,
        )
        values = dsir_scores(ref, [ctx.corpus.text(int(i)) for i in idx])
        # importance resampling proper: Gumbel-top-k at tau = 1 draws in proportion to the weight
        sampler, temperature = "gumbel", 1.0
    elif s.method == "perplexity":
        values = _stage0_losses(ctx, lm, idx, k - 1)
        sampler, temperature = "topk", None  # keep the lowest per-token losses
    else:  # pragma: no cover - config validation lists the methods
        raise ConfigError(f"`selection.method` {s.method!r} needs an influence model")
    rows = [{"id": d, "score": float(v)} for d, v in zip(pool_ids, values, strict=True)]
    select(
        ctx,
        k,
        scores=rows,
        method=s.method,
        sampler=sampler,
        temperature=temperature,
        extra={"score_seconds": round(time.perf_counter() - t0, 3)},
    )
    write_jsonl(ctx.paths.stage(k - 1) / f"{s.method}-scores.jsonl", rows)


def label_mask(ctx: Context) -> np.ndarray:
    """Corpus documents whose label matches `selection.target_labels` (or a label below one)."""
    if ctx.labels is None:
        ctx.labels = target_label_mask(
            [ctx.corpus.domain(i) for i in range(len(ctx.corpus))],
            ctx.cfg.selection.target_labels,
            setting="`selection.target_labels`",
            field=ctx.cfg.data.domain_field,
        )
    return ctx.labels


def _stage0_losses(ctx: Context, lm: LM, idx: np.ndarray, k: int) -> np.ndarray:
    """Per-token loss of each document (its first `seq_tokens`) under the stage-0 checkpoint."""
    cfg = ctx.cfg
    T = cfg.train.seq_tokens
    tokens = [[ctx.eos] + ctx.corpus.token_ids(int(i))[: T - 1].tolist() for i in idx]
    ref = pack_rows([(t, len(t) - 1) for t in tokens], "pool", list(range(len(tokens))))
    model = build_lm(cfg.model, len(ctx.tokenizer), T, ctx.eos)
    model.load_state_dict(load_file(ctx.paths.checkpoint(0) / "model.safetensors"))
    torch.nn.Module.to(model, ctx.device)  # PreTrainedModel.to's wrapper hides its signature
    tc = cfg.train
    sums, counts, _ = row_losses(model, ref, tc.eval_batch_sequences, tc.precision)
    per_doc = np.zeros(len(tokens))
    per_doc[ref.docs.numpy()] = (sums / counts.clamp(min=1)).numpy()
    ctx.record_flops(k, "select", lm.eval_flops(ref))
    return per_doc


def _domain_counts(ctx: Context, idx: np.ndarray) -> dict[str, int]:
    return dict(sorted(Counter(ctx.corpus.domain(int(i)) or "-" for i in idx).items()))


def quality_gate(ctx: Context, k: int) -> dict:
    """Whether stage k's influence model may select: the lower end of the interval of its
    cross-validated Spearman must lie above `selection.min_cv_spearman` ('static': stage
    0's model). A failed gate is logged as a run event; the caller falls back."""
    s = ctx.cfg.selection
    fit_stage = 0 if s.method == "static" else k
    fit = ctx.manifest.stage(fit_stage)["metrics"].get("influence_model") or {}
    gate = {
        "stage": fit_stage,
        "cv_spearman": fit.get("val_spearman"),
        "cv_low": fit.get("cv_low"),
        "cv_high": fit.get("cv_high"),
        "min_cv_spearman": s.min_cv_spearman,
    }
    if "cv_folds" not in fit:  # fitted before cross-validation was recorded: nothing to gate on
        return {**gate, "passed": True, "reason": "no cross-validated Spearman recorded"}
    low = fit.get("cv_low")
    gate["passed"] = low is not None and low > s.min_cv_spearman
    if not gate["passed"]:
        rho = "undefined" if fit.get("val_spearman") is None else f"{fit['val_spearman']:.3f}"
        interval = "" if low is None else f" [{low:.3f}, {fit['cv_high']:.3f}] "
        msg = (
            f"stage {k}: the influence model's cross-validated Spearman {rho}{interval}does not "
            f"clear selection.min_cv_spearman = {s.min_cv_spearman}; stage {k + 1} selects "
            + (
                "with the model anyway (selection.fallback: none)"
                if s.fallback == "none"
                else f"by '{s.fallback}' instead (selection.fallback)"
            )
        )
        gate["reason"] = msg
        log.warning(msg)
        ctx.event(k, "influence_gate", message=msg, fallback=s.fallback)
    return gate
