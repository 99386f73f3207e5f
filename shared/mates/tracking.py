"""Experiment tracking: what a run records in metrics.jsonl and in its stage metrics, also
sent to TensorBoard and/or Weights & Biases (`tracking:` in the config; off by default).

The x axis is tokens trained on, so the arms of a comparison (each a run, its TensorBoard
folder under the comparison's, its W&B run in the comparison's group) overlay on one chart.
Per metrics row: train, reference and held-out losses and the learning rate. Per stage
that selects: the selection's label mix against its pool's, the influence model's
validation and cross-validated Spearman, and the seconds spent selecting (probe, fit,
score, select). Only the primary process (rank 0) tracks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mates.config import RunConfig
from mates.errors import ConfigError

log = logging.getLogger(__name__)

SELECTION_STEPS = ("probing", "fitting", "scoring", "selecting")


class Tracker:
    """Sends scalars to the backends the config names; `close()` flushes them."""

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str):
        t = cfg.tracking
        self._tb: Any = None
        self._wandb: Any = None
        if t.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "`tracking.tensorboard` needs the tensorboard package (pip install tensorboard)"
                ) from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if t.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "`tracking.wandb` needs the wandb package (pip install wandb)"
                ) from None
            self._wandb = wandb.init(
                project=t.wandb_project,
                name=cfg.name,
                id=run_id,
                group=t.group,
                dir=str(run_dir),
                mode=t.wandb_mode,
                resume="allow",
                config=cfg.model_dump(mode="json"),
                settings=wandb.Settings(silent=True, console="off"),
            )
            self._wandb.define_metric("tokens")
            self._wandb.define_metric("*", step_metric="tokens")

    def log(self, scalars: Mapping[str, float | None], tokens: int) -> None:
        values = {k: float(v) for k, v in scalars.items() if v is not None}
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, global_step=tokens)
        if self._wandb is not None:
            self._wandb.log({**values, "tokens": tokens})

    def metrics_row(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl."""
        scalars = {
            "loss/train": row.get("train_loss"),
            "loss/reference": row.get("reference_loss"),
            "lr": row.get("lr"),
            "stage": row.get("stage"),
        }
        for name, value in (row.get("heldout") or {}).items():
            scalars[f"loss/heldout/{name}"] = value
        self.log(scalars, int(row["tokens"]))

    def stage_end(self, k: int, stages: list[dict[str, Any]], tokens: int) -> None:
        """After stage k: its influence model and selection overhead, and the selection it
        made for stage k+1 (label shares of the selection and of its pool), from run.json."""
        m = stages[k].get("metrics", {})
        scalars: dict[str, float] = {}
        fit = m.get("influence_model") or {}
        for key in ("val_spearman", "cv_low", "cv_high"):
            if isinstance(fit.get(key), (int, float)):
                scalars[f"influence/{key}"] = fit[key]
        timings = stages[k].get("timings", {})
        overhead = sum(float(timings.get(s, 0.0)) for s in SELECTION_STEPS)
        if overhead:
            scalars["selection/overhead_seconds"] = overhead
        sel = stages[k + 1].get("metrics", {}).get("selection") if k + 1 < len(stages) else None
        if isinstance(sel, dict):
            chosen, pool = sel.get("domains") or {}, sel.get("pool_domains") or {}
            n_chosen, n_pool = sum(chosen.values()), sum(pool.values())
            for label in sorted(set(chosen) | set(pool)):
                if n_chosen:
                    scalars[f"selection/share/{label}"] = chosen.get(label, 0) / n_chosen
                if n_pool:
                    scalars[f"pool/share/{label}"] = pool.get(label, 0) / n_pool
        if scalars:
            self.log({**scalars, "stage": k}, tokens)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def open_tracker(cfg: RunConfig, run_dir: Path, run_id: str, primary: bool) -> Tracker | None:
    if not primary or not (cfg.tracking.tensorboard or cfg.tracking.wandb):
        return None
    return Tracker(cfg, run_dir, run_id)
