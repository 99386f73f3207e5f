"""MATES against random selection with the same seeds and token budget."""

from __future__ import annotations

import logging
from pathlib import Path

from mates.artifacts import RunPaths, atomic_path, read_json, read_jsonl, write_json
from mates.config import RunConfig
from mates.errors import ConfigError
from mates.report import write_report
from mates.run import Run

log = logging.getLogger(__name__)


def heldout_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(tokens, held-out loss) points of a run, in training order."""
    rows = read_jsonl(RunPaths(Path(run_dir)).metrics)
    return [(int(r["tokens"]), float(r["heldout_loss"])) for r in rows]


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count at which the curve reaches `target`, linearly interpolated."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tokens)
            t0, l0 = prev
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        prev = (tokens, loss)
    return None


def summarize(mates_dir: Path, random_dir: Path) -> dict:
    mates_curve, random_curve = heldout_curve(mates_dir), heldout_curve(random_dir)
    target = random_curve[-1][1]
    random_tokens = random_curve[-1][0]
    reach = tokens_to_reach(mates_curve, target)

    def arm(run_dir: Path, curve: list) -> dict:
        m = read_json(RunPaths(Path(run_dir)).manifest)
        timings: dict[str, float] = {}
        for st in m["stages"]:
            for name, sec in st["timings"].items():
                timings[name] = round(timings.get(name, 0.0) + sec, 2)
        return {"run_dir": str(run_dir), "run_id": m["run_id"], "status": m["status"],
                "curve": [{"tokens": t, "heldout_loss": v} for t, v in curve],
                "final_heldout_loss": curve[-1][1], "final_tokens": curve[-1][0],
                "seconds_by_state": timings}

    return {
        "mates": arm(mates_dir, mates_curve),
        "random": arm(random_dir, random_curve),
        "target_heldout_loss": target,
        "mates_tokens_to_match": reach,
        "tokens_to_match_ratio": None if reach is None else round(reach / random_tokens, 4),
        "final_loss_delta": round(mates_curve[-1][1] - target, 5),
    }


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, color in (("random", "tab:gray"), ("mates", "tab:blue")):
        pts = summary[name]["curve"]
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["heldout_loss"] for p in pts], "-o",
                ms=3, color=color, label=f"{name} (final {summary[name]['final_heldout_loss']:.3f})")
    ax.axhline(summary["target_heldout_loss"], color="tab:gray", ls=":", lw=1)
    if summary["mates_tokens_to_match"] is not None:
        ax.axvline(summary["mates_tokens_to_match"] / 1e6, color="tab:blue", ls=":", lw=1,
                   label=f"MATES matches random at {summary['tokens_to_match_ratio']:.2f}x tokens")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out loss")
    ax.set_title("MATES vs random selection: held-out loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def compare(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict:
    """Run both arms (the random arm reuses the identical stage 0) and write the comparison."""
    if cfg.selection.method == "random":
        raise ConfigError("`selection.method` must be model-based (gumbel or topk) for compare")
    out_dir = Path(out_dir)
    rand_cfg = cfg.model_copy(deep=True)
    rand_cfg.selection.method = "random"
    rand_cfg.name = f"{cfg.name}-random"[:64]
    arms = {"mates": out_dir / "mates", "random": out_dir / "random"}
    for name, c in (("mates", cfg), ("random", rand_cfg)):
        run = Run(c, arms[name], progress=progress)
        if run.manifest.data["status"] != "done":
            log.info("running %s arm into %s", name, arms[name])
            run.execute(seed_stage0_from=arms["mates"] if name == "random" else None)
    summary = summarize(arms["mates"], arms["random"])
    write_json(out_dir / "comparison.json", summary)
    plot(summary, out_dir / "comparison.png")
    write_report(arms["mates"], out_dir / "report.html", baseline_dir=arms["random"])
    return summary
