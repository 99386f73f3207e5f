"""How well first-order probes agree with exact ones, by stage checkpoint and probe lr.

`mates probe-agreement RUN_DIR` re-probes a finished (or partly finished) run's
end-of-stage checkpoints with the exact oracle and the first-order ones on the
probe documents the run itself drew, at several probe learning rates, and reports
Spearman(first-order, exact) for each (stage, lr). The run directory is only read.

The first-order approximation holds while one probe step stays in the linear regime:
small lr, or a later checkpoint where gradients are smaller than the clip. This is
the table that tells a user which `probing.lr` and `probing.method` to trust.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from mates.artifacts import read_json
from mates.errors import ConfigError
from mates.probe import ExactOracle, FirstOrderOracle
from mates.run import Run
from mates.stats import spearman

log = logging.getLogger(__name__)

METHODS = ("first_order", "first_order_shift")


def probeable_stages(run: Run) -> list[int]:
    """Stages with an end-of-stage checkpoint and a next stage's pool to probe."""
    out = []
    for k in range(run.cfg.stages.num_stages - 1):
        meta = run.paths.checkpoint(k) / "trainer.json"
        if meta.is_file() and read_json(meta).get("complete") and run.paths.pool(k + 1).is_file():
            out.append(k)
    return out


def probe_agreement(
    run_dir: Path, lrs: list[float], probes: int, stages: list[int] | None = None
) -> list[dict]:
    """One row per (stage, lr): Spearman of each first-order method against exact probes."""
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ConfigError(f"probe lrs must be positive numbers, got {lrs}")
    if probes < 3:
        raise ConfigError(f"--probes must be at least 3 for a rank correlation, got {probes}")
    run = Run.open(Path(run_dir), progress=False)
    run.manifest.readonly = True  # this tool reads the run; it never writes to it
    run.ctx.build_data()
    available = probeable_stages(run)
    stages = available if stages is None else stages
    missing = sorted(set(stages) - set(available))
    if missing:
        raise ConfigError(
            f"{run_dir}: no finished checkpoint with a next pool for stage(s) "
            f"{missing}; probeable stages: {available}"
        )
    tc = run.cfg.train
    rows = []
    for k in stages:
        tokens = run.probe_documents(k)[2][:probes]  # the run's own probes, first ones first
        trainer = run._build_trainer()
        trainer.load(run.paths.checkpoint(k))
        for lr in lrs:
            kw = dict(
                lr=lr,
                grad_clip=tc.grad_clip,
                precision=tc.precision,
                eval_batch_sequences=tc.eval_batch_sequences,
            )
            t0 = time.perf_counter()
            exact = ExactOracle(trainer.model, trainer.optimizer, run.reference, **kw)
            exact_vals = np.array([exact.influence(t) for t in tokens])
            row = {
                "stage": k,
                "lr": lr,
                "probes": len(tokens),
                "exact_s": round(time.perf_counter() - t0, 2),
                "clipped_fraction": exact.clipped / len(tokens),
            }
            for method in METHODS:
                t0 = time.perf_counter()
                fo = FirstOrderOracle(
                    trainer.model,
                    trainer.optimizer,
                    run.reference,
                    shift=method == "first_order_shift",
                    **kw,
                )
                vals = np.array([fo.influence(t) for t in tokens])
                row[f"{method}_spearman"] = round(float(spearman(vals, exact_vals)), 4)
                row[f"{method}_s"] = round(time.perf_counter() - t0, 2)
            log.info("stage %d lr %g: %s", k, lr, row)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "stage",
        "probe lr",
        "probes",
        "clipped",
        "Spearman first-order",
        "Spearman shifted",
        "exact s",
        "first-order s",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(
            " | ".join(
                [
                    str(r["stage"]),
                    f"{r['lr']:g}",
                    str(r["probes"]),
                    f"{r['clipped_fraction']:.0%}",
                    f"{r['first_order_spearman']:.3f}",
                    f"{r['first_order_shift_spearman']:.3f}",
                    f"{r['exact_s']:.1f}",
                    f"{r['first_order_s']:.1f}",
                ]
            )
        )
    return "\n".join(lines)
