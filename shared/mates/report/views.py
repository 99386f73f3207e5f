"""What a run looks like as plain data: `run_view` (config, history, per-stage statistics,
loss points), `overlay_view` and the comparison arms beside a run. The history is
`mates.report.history`'s."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from mates.artifacts import RunPaths, read_json, read_jsonl
from mates.errors import ArtifactError, MatesError
from mates.manifest import RunStatus
from mates.report.history import _history
from mates.report.text import is_number

log = logging.getLogger(__name__)


PHASES = ("training", "probing", "fitting", "scoring", "selecting")
PHASE_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756")


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _selection(paths: RunPaths, k: int) -> dict | None:
    path = paths.selection(k)
    return read_json(path) if path.is_file() else None


def _domain_shift(sel: dict) -> dict[str, dict[str, float]]:
    """Share of each domain in the selection and in the pool it was drawn from."""
    chosen, pool = sel.get("domains") or {}, sel.get("pool_domains") or {}
    if not pool or set(pool) == {"-"}:
        return {}  # the corpus has no domain field
    n_sel, n_pool = max(sum(chosen.values()), 1), max(sum(pool.values()), 1)
    return {
        d: {"selected": chosen.get(d, 0) / n_sel, "pool": pool[d] / n_pool} for d in sorted(pool)
    }


def config_summary(cfg: dict) -> dict[str, Any]:
    """The settings a reader of a run needs first, flat, from run.json's resolved config."""

    def get(section: str, key: str) -> Any:
        return (cfg.get(section) or {}).get(key)

    seq, batch = get("train", "seq_tokens"), get("train", "batch_sequences")
    per_step = seq * batch if is_number(seq) and is_number(batch) else None
    n, s0, s = (
        get("stages", "num_stages"),
        get("stages", "stage0_steps"),
        get("stages", "stage_steps"),
    )
    t0, t = get("stages", "stage0_tokens"), get("stages", "stage_tokens")
    if (
        is_number(t0) and is_number(t) and per_step
    ):  # token budgets: whole steps (RunConfig.stage_steps)
        s0, s = max(1, -(-t0 // per_step)), max(1, -(-t // per_step))
    steps = s0 + (n - 1) * s if is_number(n) and is_number(s0) and is_number(s) else None
    method = get("selection", "method")
    sampler = (
        method
        if method in ("gumbel", "topk")
        else get("selection", "sampler")
        if method in ("mates", "static")
        else None
    )
    return {
        "seed": cfg.get("seed"),
        "selection_method": method,
        "sampler": sampler,
        "selection_ratio": get("selection", "ratio"),
        "temperature": get("selection", "temperature"),
        "cooldown_fraction": get("train", "cooldown_fraction"),
        "probe_method": get("probing", "method"),
        "num_probes": get("probing", "num_probes"),
        "probe_lr": get("probing", "lr"),
        "influence_encoder": get("influence", "encoder"),
        "influence_epochs": get("influence", "epochs"),
        "train_encoder": get("influence", "train_encoder"),
        "head_fit": get("influence", "head_fit"),
        "cv_folds": get("influence", "cv_folds"),
        "num_stages": n,
        "stage0_steps": s0,
        "stage_steps": s,
        "pool_docs": get("stages", "pool_docs"),
        "stage0_tokens": t0,
        "stage_tokens": t,
        "pool_multiple": get("stages", "pool_multiple"),
        "pool_mode": get("stages", "pool_mode"),
        "chunk_tokens": get("data", "chunk_tokens"),
        "batch_sequences": batch,
        "seq_tokens": seq,
        "tokens_per_step": per_step,
        "total_steps": steps,
        "total_tokens": per_step * steps if per_step and steps else None,
    }


def _val_n(fit: dict, probes: dict, cfg: dict) -> int | None:
    """Points behind the influence model's validation Spearman: the fit's `val_size` (every
    probe, predicted out of fold, since fits are cross-validated), or for a run from before
    that, the held-out share of the probes as the 90/10 split took it."""
    if is_number(fit.get("val_size")):
        return int(fit["val_size"])
    count, frac = probes.get("count"), (cfg.get("influence") or {}).get("val_fraction", 0.1)
    if not fit or not is_number(count) or not is_number(frac):
        return None
    return max(2, int(round(count * frac)))


def _kept(rows: list[dict], sel: dict | None) -> list[bool] | None:
    """Which scored documents the next stage's selection kept, aligned with `rows`."""
    if not rows or not sel or "ids" not in sel:
        return None
    ids = set(sel["ids"])
    return [r.get("id") in ids for r in rows]


def _cut(scores: list[float], kept: list[bool] | None, sel: dict | None) -> dict | None:
    """Where the selection cut the scores: top-k keeps every score up to the largest kept
    one; Gumbel sampling keeps a spread, so its line is the kept scores' 90th percentile."""
    vals = [s for s, k in zip(scores, kept or [], strict=False) if k]
    method = (sel or {}).get("sampler") or (sel or {}).get("method")
    if not vals or method not in ("topk", "gumbel"):
        return None
    if method == "topk":
        return {
            "method": method,
            "score": float(max(vals)),
            "label": "cut: every kept score ≤ this",
        }
    return {
        "method": method,
        "score": float(np.quantile(vals, 0.9)),
        "label": "90% of kept scores ≤ this",
    }


def _cooldown(paths: RunPaths, k: int) -> dict | None:
    """The primary set's held-out evaluation after stage k's lr-cooldown branch, if run."""
    path = paths.cooldown(k)
    if not path.is_file():
        return None
    c = read_json(path)
    primary = c.get("primary")
    point = (c.get("sets") or {}).get(primary) or {}
    if not is_number(point.get("loss")) or not is_number(c.get("tokens")):
        return None
    return {
        "tokens": c["tokens"],
        "set": primary,
        "loss": point["loss"],
        "accuracy": point.get("accuracy"),
        "kind": point.get("kind"),
    }


def _stage_view(
    paths: RunPaths, st: dict, cfg: dict, sel: dict | None, prev: dict | None, nxt: dict | None
) -> dict[str, Any]:
    """One stage; `sel` is the selection it trained on, `prev` the stage before's and `nxt`
    the next stage's (drawn from the pool this stage's model scored)."""
    k, met = st["stage"], st.get("metrics") or {}
    probes, fit = met.get("probes") or {}, met.get("influence_model") or {}
    overlap = None
    if sel and prev and sel.get("ids") and prev.get("ids"):
        ids = set(sel["ids"])
        overlap = len(ids & set(prev["ids"])) / len(ids)
    score_rows = _rows(paths.scores(k))
    scores = [r["score"] for r in score_rows]
    kept = _kept(score_rows, nxt)
    fo = probes.get("first_order_spearman")
    return {
        "stage": k,
        "state": st["state"],
        "seconds": {p: st.get("timings", {}).get(p) for p in PHASES},
        "heldout_loss": met.get("heldout_loss"),
        "reference_loss": met.get("reference_loss"),
        "tokens": met.get("tokens"),
        "probe_method": probes.get("method"),
        "probe_count": probes.get("count"),
        "first_order_spearman": fo,
        "first_order_n": probes.get("exact_subset") if fo is not None else None,
        "val_spearman": fit.get("val_spearman"),
        "val_n": _val_n(fit, probes, cfg),
        "cv_interval": (
            [fit["cv_low"], fit["cv_high"]]
            if is_number(fit.get("cv_low")) and is_number(fit.get("cv_high"))
            else None
        ),
        "shared_effect": probes.get("shared_effect"),
        "selected": (met.get("selection") or {}).get("selected"),
        "fallback": (met.get("selection") or {}).get("fallback"),
        "selection_method": (met.get("selection") or {}).get("method"),
        "overlap_with_previous": overlap,
        "domain_shift": _domain_shift(met.get("selection") or {}),
        "influences": [r["influence"] for r in _rows(paths.probes(k))],
        "scores": scores,
        "kept": kept,
        "cut": _cut(scores, kept, nxt),
        "cooldown": _cooldown(paths, k),
        "error": st.get("error"),
    }


def run_view(run_dir: Path) -> dict[str, Any]:
    """A run's state, curves and per-stage statistics, read from its directory."""
    paths = RunPaths(Path(run_dir))
    if not paths.manifest.is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no run.json)")
    m = read_json(paths.manifest)
    end = (
        m["updated_at"]
        if m["status"] in (RunStatus.DONE, RunStatus.FAILED, RunStatus.CANCELLED)
        else time.time()
    )
    cfg = m.get("config") or {}
    sels = [_selection(paths, st["stage"]) for st in m["stages"]]
    stages = [
        _stage_view(
            paths,
            st,
            cfg,
            sels[i],
            sels[i - 1] if i else None,
            sels[i + 1] if i + 1 < len(sels) else None,
        )
        for i, st in enumerate(m["stages"])
    ]
    return {
        "run_id": m["run_id"],
        "name": m["name"],
        "status": m["status"],
        "current_stage": m.get("current_stage"),
        "error": m.get("error"),
        "created_at": m["created_at"],
        "elapsed_s": max(0.0, end - m["created_at"]),
        "config": config_summary(cfg),
        "history": _history(m, _rows(paths.events)),
        "curve": _curve(paths),
        "stages": stages,
    }


def _curve(paths: RunPaths) -> list[dict]:
    return [
        {k: r.get(k) for k in ("stage", "step", "tokens", "heldout_loss", "reference_loss")}
        for r in _rows(paths.metrics)
    ]


def overlay_view(run_dir: Path, label: str | None = None) -> dict[str, Any]:
    """What another arm contributes to a run's loss chart: its held-out curve and cooldown
    points, named `label` (its folder in a comparison) or else its run name."""
    paths = RunPaths(Path(run_dir))
    if not paths.manifest.is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no run.json)")
    m = read_json(paths.manifest)
    return {
        "run_id": m["run_id"],
        "name": m["name"],
        "status": m["status"],
        "label": label or m["name"],
        "selection_method": ((m.get("config") or {}).get("selection") or {}).get("method"),
        "curve": _curve(paths),
        "stages": [
            {
                "stage": st["stage"],
                "cooldown": _cooldown(paths, st["stage"]),
                "heldout_loss": (st.get("metrics") or {}).get("heldout_loss"),
            }
            for st in m["stages"]
        ],
    }


SEED_DIR = re.compile(r"seed-\d+")


def sibling_arms(run_dir: Path) -> list[Path]:
    """The other arms of the comparison a run directory belongs to, random first: every
    sibling with a run.json in `mates compare`'s `DIR/seed-<s>/<arm>/`, or the `random/`
    beside a `mates/` (the older two-arm layout; its random arm gets none)."""
    here = Path(run_dir)
    parent = here.parent
    if SEED_DIR.fullmatch(parent.name):
        arms = [
            p
            for p in parent.iterdir()
            if p.name != here.name and p.is_dir() and RunPaths(p).manifest.is_file()
        ]
        return sorted(arms, key=lambda p: (p.name != "random", p.name))
    if here.name == "mates" and RunPaths(parent / "random").manifest.is_file():
        return [parent / "random"]
    return []


def arm_overlays(run_dir: Path) -> list[dict]:
    """Overlay views of the run's sibling arms, each named by its folder; an arm whose
    artifacts cannot be read is left out rather than failing the run's page."""
    out = []
    for arm in sibling_arms(run_dir):
        try:
            out.append(overlay_view(arm, arm.name))
        except (MatesError, OSError, KeyError, ValueError, TypeError) as e:
            log.warning("arm %s left out of %s's charts: %s", arm, run_dir, e)
    return out
