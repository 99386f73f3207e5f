"""The rows the run store hands out, typed: a run's summary (the run list), a run with its
stages and transitions (one run), a model version. Statuses and states come back as the
`RunStatus` and `StageState` of `mates.manifest`, the one vocabulary."""

from __future__ import annotations

from typing import Any, TypedDict

from mates.manifest import RunStatus, StageState


class TransitionRow(TypedDict):
    state: StageState
    at: float
    reason: str | None  # why, for failures and cancellations


class StageRow(TypedDict):
    stage: int
    state: StageState
    error: str | None
    timings: dict[str, float]
    metrics: dict[str, Any]
    updated_at: float
    transitions: list[TransitionRow]


class RunRow(TypedDict):
    id: str
    name: str
    status: RunStatus
    error: str | None
    current_stage: int
    num_stages: int
    generation: int  # bumped on every (re)queue: a task of an older generation stops
    artifacts_dir: str
    created_at: float
    updated_at: float


class RunSummary(RunRow):
    stage_state: StageState | None  # the current stage's


class RunDetail(RunRow):
    config: dict[str, Any]
    stages: list[StageRow]


class ModelVersionRow(TypedDict):
    version: str  # `<run_id>/<stage>`
    run_id: str
    stage: int
    path: str
    val_spearman: float | None
    val_pearson: float | None
    num_probes: int | None
    fit: dict[str, Any]
    created_at: float


class TaskBeat(TypedDict):
    """What a running task's heartbeat row says of it, besides its Celery ID and times."""

    run_id: str
    generation: int
    task: str
    stage: int
    shard: int  # -1: the task has no shard
    worker: str  # host and PID
