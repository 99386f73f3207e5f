"""Response bodies of the control plane (the scorer's request/response and the status
vocabulary are wire contracts: `services.common.contracts`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from mates.manifest import RunStatus, StageState
from services.common.contracts import STATUS_DOC, Problem

__all__ = ["Problem"]


class Transition(BaseModel):
    state: StageState = Field(description="the state entered")
    at: float = Field(description="when, in seconds since the epoch")
    reason: str | None = Field(None, description="why, for failures and cancellations")


class Stage(BaseModel):
    stage: int
    state: StageState
    error: str | None = None
    timings: dict[str, float] = Field(description="seconds spent per step")
    metrics: dict[str, Any] = Field(description="losses, probe and fit summaries, selection")
    updated_at: float
    transitions: list[Transition] = Field(description="every state change, oldest first")


class _RunFields(BaseModel):
    id: str
    name: str
    status: RunStatus = Field(description=STATUS_DOC)
    error: str | None = None
    current_stage: int
    num_stages: int
    generation: int = Field(description="bumped on every (re)queue; stale tasks check it")
    artifacts_dir: str = Field(description="the run's directory in the artifact store")
    created_at: float
    updated_at: float


class RunSummary(_RunFields):
    stage_state: StageState | None = Field(None, description="state of the current stage")


class Run(_RunFields):
    config: dict[str, Any] = Field(description="the resolved run config")
    stages: list[Stage]


class StageMetrics(BaseModel):
    stage: int
    metrics: dict[str, Any]


class RunMetrics(BaseModel):
    run_id: str
    rows: list[dict[str, Any]] = Field(description="the run's metrics log, one row per evaluation")
    stages: list[StageMetrics] = Field(description="the per-stage summaries of run.json")


class ModelVersion(BaseModel):
    version: str = Field(description="`<run_id>/<stage>`")
    run_id: str
    stage: int
    path: str = Field(description="the model directory in the artifact store")
    val_spearman: float | None = None
    val_pearson: float | None = None
    num_probes: int | None = None
    fit: dict[str, Any] = Field(description="the fit report")
    created_at: float


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    checks: dict[str, str] = Field(description="`ok`, or why a dependency is unavailable")
