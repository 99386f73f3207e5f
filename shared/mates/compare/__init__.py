"""Judging selection methods: arms × seeds, paired intervals, tokens and compute to match.

For each seed every arm shares the identical stage-0 checkpoint (the first arm trains it,
the others copy it), the same stage-1 pool and the same token budget; only the selection
differs. Arms are read at their cooldown evaluations (`Run._cooldown_eval`): the primary
held-out set's loss at each stage end after a short lr decay, so constant-lr noise does
not decide. The summary (comparison.json, schema in docs/comparison.md) holds per arm:
the final loss with a t-interval over seeds, the paired difference to `random` with a
t-interval over seeds and a bootstrap over held-out documents, tokens-to-match and
compute-to-match per seed (censored when never reached), and the compute ledger.

One module each: `arms` (each arm's config, the checks, the seeds), `reading` (an arm's
curve, cooldown points and compute ledger), `summary` (comparison.json), `table`, `chart`
(comparison.png) and `report` (report.html); `compare` runs the arms and writes them all.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mates.artifacts import write_json
from mates.compare.arms import AA_ARM, arm_config, arm_dir, check_arms, seeds_of
from mates.compare.chart import plot
from mates.compare.reading import SELECTION_PHASES, cooldown_points, heldout_curve, ledger
from mates.compare.reading import _compute_at as _compute_at
from mates.compare.report import write_comparison_report
from mates.compare.summary import _to_match as _to_match
from mates.compare.summary import summarize
from mates.compare.table import format_table, table_rows
from mates.config import RunConfig
from mates.manifest import RunStatus
from mates.run import Run

__all__ = [
    "AA_ARM",
    "SELECTION_PHASES",
    "arm_config",
    "arm_dir",
    "check_arms",
    "compare",
    "cooldown_points",
    "format_table",
    "heldout_curve",
    "ledger",
    "plot",
    "seeds_of",
    "summarize",
    "table_rows",
    "write_comparison_report",
]

log = logging.getLogger(__name__)


def compare(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict:
    """Run every arm at every seed (resuming what exists) and write the comparison."""
    check_arms(cfg)
    out_dir = Path(out_dir)
    arms = sorted(cfg.compare.arms, key=lambda a: a != "random")  # random trains stage 0
    prepared: Path | None = None  # the first run's tokenizer and corpus serve every seed
    for seed in seeds_of(cfg):
        first: Path | None = None
        probed: Path | None = None  # the first model-based arm's stage-0 probes serve the others
        for arm in arms:
            where = arm_dir(out_dir, seed, arm)
            acfg = arm_config(cfg, arm, seed)
            run = Run(acfg, where, progress=progress)
            if run.manifest.data["status"] != RunStatus.DONE:
                log.info("seed %d: running arm %s into %s", seed, arm, where)
                run.execute(seed_stage0_from=first, prepared_from=prepared, probes_from=probed)
            first = first or where
            prepared = prepared or where
            if probed is None and acfg.selection.model_based:
                probed = where
    summary = summarize(cfg, out_dir)
    write_json(out_dir / "comparison.json", summary)
    plot(summary, out_dir / "comparison.png")
    write_comparison_report(summary, out_dir / "comparison.png", out_dir / "report.html")
    return summary
