"""Reading one arm's run folder: its held-out curve, its cooldown evaluations and its
compute ledger (FLOPs and seconds by phase), and the compute spent to reach a token count."""

from __future__ import annotations

from pathlib import Path

from mates.artifacts import RunPaths, read_json, read_jsonl

SELECTION_PHASES = ("probe", "fit", "score", "select")


def heldout_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(tokens, primary held-out loss) at every constant-lr evaluation, in training order."""
    rows = read_jsonl(RunPaths(Path(run_dir)).metrics)
    return [(int(r["tokens"]), float(r["heldout_loss"])) for r in rows]


def cooldown_points(run_dir: Path) -> list[dict]:
    """Each stage's cooldown evaluation, in stage order (stages without one are skipped)."""
    paths = RunPaths(Path(run_dir))
    m = read_json(paths.manifest)
    return [
        read_json(paths.cooldown(st["stage"]))
        for st in m["stages"]
        if paths.cooldown(st["stage"]).is_file()
    ]


def ledger(run_dir: Path) -> dict:
    """Per stage: analytic FLOPs and wall seconds by phase; totals; selection ÷ training."""
    m = read_json(RunPaths(Path(run_dir)).manifest)
    stages: list[dict] = []
    totals: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for st in m["stages"]:
        flops = dict(st["metrics"].get("flops") or {})
        sel = sum(flops.get(p, 0.0) for p in SELECTION_PHASES)
        train = flops.get("train", 0.0)
        stages.append(
            {
                "stage": st["stage"],
                "flops": flops,
                "seconds": st["timings"],
                "tokens": st["metrics"].get("tokens"),
                "selection_over_training": round(sel / train, 6) if train else None,
            }
        )
        for phase, v in flops.items():
            totals[phase] = totals.get(phase, 0.0) + v
        for phase, v in st["timings"].items():
            seconds[phase] = round(seconds.get(phase, 0.0) + v, 3)
    sel = sum(totals.get(p, 0.0) for p in SELECTION_PHASES)
    return {
        "stages": stages,
        "flops": totals,
        "seconds": seconds,
        "selection_flops": sel,
        "training_flops": totals.get("train", 0.0),
        "selection_over_training": round(sel / totals["train"], 6) if totals.get("train") else None,
    }


def _compute_at(led: dict, tokens: float) -> float:
    """Training FLOPs to reach `tokens`, plus the selection FLOPs of every selection used by then."""
    total, prev_end = 0.0, 0
    for st in led["stages"]:
        end = st["tokens"] or 0
        train = st["flops"].get("train", 0.0)
        if tokens <= prev_end:
            break
        span = end - prev_end
        used = min(tokens, end) - prev_end
        total += train * used / span if span else 0.0
        if tokens > end:  # this stage's selection chose data trained on before `tokens`
            total += sum(st["flops"].get(p, 0.0) for p in SELECTION_PHASES)
        prev_end = end
    return total
