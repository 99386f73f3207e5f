"""The comparison over arms and seeds (the comparison.json document): per arm the final
losses with t-intervals over seeds, the paired difference to random (by stage, and a
bootstrap over held-out documents), and tokens- and compute-to-match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mates.compare.arms import AA_ARM, arm_dir, seeds_of
from mates.compare.reading import _compute_at, cooldown_points, heldout_curve, ledger
from mates.config import RunConfig
from mates.stats import (
    Interval,
    bootstrap_paired_difference,
    censored_summary,
    t_interval,
    tokens_to_match,
)


def summarize(cfg: RunConfig, out_dir: Path) -> dict:
    """The comparison over arms and seeds (the comparison.json document)."""
    cc = cfg.compare
    seeds = seeds_of(cfg)
    arms = sorted(cc.arms, key=lambda a: a != "random")
    runs = {a: {s: _read_arm(arm_dir(out_dir, s, a)) for s in seeds} for a in arms}
    primary = cfg.data.primary
    summary: dict[str, Any] = {
        "schema": "mates.comparison/1",
        "name": cfg.name,
        "arms": arms,
        "seeds": seeds,
        "primary_heldout": primary,
        "heldout_sets": [h.name for h in cfg.data.heldout_specs()],
        "confidence": cc.confidence,
        "runs": {a: {str(s): runs[a][s]["view"] for s in seeds} for a in arms},
        "summary": {},
    }
    for a in arms:
        summary["summary"][a] = _arm_summary(a, runs, seeds, primary, cc)
    if AA_ARM in arms and "random" in arms:
        aa = summary["summary"][AA_ARM]["difference_to_random"]
        summary["aa_spread"] = {"final": aa["final"], "by_stage": aa["by_stage"]}
    return summary


def _read_arm(run_dir: Path) -> dict:
    points = cooldown_points(run_dir)
    led = ledger(run_dir)
    view = {
        "run_dir": str(run_dir),
        "curve": [{"tokens": t, "heldout_loss": v} for t, v in heldout_curve(run_dir)],
        "cooldown": [
            {
                "stage": p["stage"],
                "tokens": p["tokens"],
                "primary": p["primary"],
                **{
                    name: {k: v for k, v in s.items() if k not in ("doc_sums", "doc_counts")}
                    for name, s in p["sets"].items()
                },
            }
            for p in points
        ],
        "ledger": led,
    }
    return {"view": view, "points": points, "ledger": led}


def _final_sets(arm: dict) -> dict:
    return arm["points"][-1]["sets"]


def _interval(values: list[float], cc) -> dict:
    """Mean with a t-interval over seeds (just the mean when intervals are off)."""
    if cc.intervals and len(values) >= 2:
        return t_interval(values, cc.confidence).as_dict()
    return {
        "estimate": round(float(np.mean(values)), 6),
        "low": None,
        "high": None,
        "n": len(values),
    }


def _arm_summary(arm: str, runs: dict, seeds: list[int], primary: str, cc) -> dict:
    mine = runs[arm]
    finals = {
        name: [_final_sets(mine[s])[name]["loss"] for s in seeds]
        for name in _final_sets(mine[seeds[0]])
    }
    out = {
        "final": {name: _interval(v, cc) for name, v in finals.items()},
        "final_accuracy": {
            name: _interval([_final_sets(mine[s])[name]["accuracy"] for s in seeds], cc)
            for name, st in _final_sets(mine[seeds[0]]).items()
            if st.get("accuracy") is not None
        },
        "selection_over_training": _interval(
            [mine[s]["ledger"]["selection_over_training"] or 0.0 for s in seeds], cc
        ),
        "seconds": {str(s): mine[s]["ledger"]["seconds"] for s in seeds},
    }
    if "random" not in runs:
        return out
    base = runs["random"]
    by_stage = []
    for j in range(len(mine[seeds[0]]["points"])):
        diffs = [
            mine[s]["points"][j]["sets"][primary]["loss"]
            - base[s]["points"][j]["sets"][primary]["loss"]
            for s in seeds
        ]
        by_stage.append(
            {
                "stage": mine[seeds[0]]["points"][j]["stage"],
                "tokens": mine[seeds[0]]["points"][j]["tokens"],
                **_interval(diffs, cc),
                "per_seed": [round(d, 6) for d in diffs],
            }
        )
    sums_a = np.array([_final_sets(mine[s])[primary]["doc_sums"] for s in seeds])
    sums_b = np.array([_final_sets(base[s])[primary]["doc_sums"] for s in seeds])
    counts = np.array([_final_sets(mine[s])[primary]["doc_counts"] for s in seeds])
    boot: Interval = bootstrap_paired_difference(
        sums_a, sums_b, counts, n_boot=cc.bootstrap, confidence=cc.confidence, seed=0
    )
    out["difference_to_random"] = {
        "final": by_stage[-1],
        "bootstrap_documents": boot.as_dict(),
        "by_stage": by_stage,
    }
    out.update(_to_match(mine, base, seeds, primary))
    return out


def _to_match(mine: dict, base: dict, seeds: list[int], primary: str) -> dict:
    """Tokens and compute the arm needs to reach random's final loss, per seed.

    Searched on cooldown points after the shared stage 0 only; None (censored) when never
    reached within the budget."""
    tokens_ratio, compute_ratio, per_seed = [], [], []
    for s in seeds:
        pts = [(p["tokens"], p["sets"][primary]["loss"]) for p in mine[s]["points"]]
        target = base[s]["points"][-1]["sets"][primary]["loss"]
        budget = base[s]["points"][-1]["tokens"]
        reach = tokens_to_match(pts, target, start_tokens=pts[0][0])
        random_train = base[s]["ledger"]["training_flops"]
        t_ratio = None if reach is None else reach / budget
        c_ratio = None if reach is None else _compute_at(mine[s]["ledger"], reach) / random_train
        tokens_ratio.append(t_ratio)
        compute_ratio.append(c_ratio)
        per_seed.append(
            {
                "seed": s,
                "target": target,
                "tokens": reach,
                "tokens_ratio": None if t_ratio is None else round(t_ratio, 4),
                "compute_ratio": None if c_ratio is None else round(c_ratio, 4),
            }
        )
    return {
        "tokens_to_match": censored_summary(tokens_ratio),
        "compute_to_match": censored_summary(compute_ratio),
        "to_match_per_seed": per_seed,
    }
