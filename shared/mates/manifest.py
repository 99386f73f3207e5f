"""The run manifest (`run.json`) and the stage state machine.

`pending → training → probing → fitting → scoring → selecting → done`, with
`failed` and `cancelled` reachable from any active state. Every transition is
recorded with a timestamp; the manifest is rewritten atomically on each change.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, NotRequired

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from mates.artifacts import read_json, write_json
from mates.errors import ArtifactError, RunStateError


class RunStatus(StrEnum):
    """A run's status, in run.json and in the services' run store. The library sets all but
    `cancelling`, which the services add: a cancel was asked and the process holding the run
    has not stopped yet."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    FAILED = "failed"
    DONE = "done"


class StageState(StrEnum):
    """A stage's state: the steps in order, then the two ways a stage ends early."""

    PENDING = "pending"
    TRAINING = "training"
    PROBING = "probing"
    FITTING = "fitting"
    SCORING = "scoring"
    SELECTING = "selecting"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


STAGE_STATES: tuple[StageState, ...] = tuple(StageState)[
    : list(StageState).index(StageState.DONE) + 1
]
"""The forward order of a stage's states (`failed` and `cancelled` are reachable from any)."""
END_STATES = (StageState.DONE, StageState.FAILED, StageState.CANCELLED)
RUN_STATUSES: tuple[RunStatus, ...] = tuple(s for s in RunStatus if s is not RunStatus.CANCELLING)
"""The statuses the library sets."""


class TransitionRecord(TypedDict):
    """One entry of a stage's history: the state it entered and when (Unix seconds)."""

    state: StageState
    at: float


@with_config(ConfigDict(extra="allow"))
class StageRecord(TypedDict):
    """One stage in run.json."""

    stage: int
    state: StageState
    transitions: list[TransitionRecord]
    timings: dict[str, float]  # seconds per phase
    metrics: dict[str, Any]
    error: str | None


@with_config(ConfigDict(extra="allow"))
class RunRecord(TypedDict):
    """run.json: the run, its config and its stages. Checked when it is read, so a damaged
    or foreign file is refused with the field that is wrong."""

    run_id: str
    name: str
    status: RunStatus
    created_at: float
    updated_at: float
    config_fingerprint: str
    config: dict[str, Any]
    current_stage: int
    error: str | None
    stages: list[StageRecord]
    corpus: NotRequired[dict[str, Any]]  # the prepared corpus's summary
    export: NotRequired[str]  # where the final model was exported


_RUN_RECORD = TypeAdapter(RunRecord)


def now() -> float:
    return round(time.time(), 3)


def new_run_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _allowed(src: StageState, dst: StageState) -> bool:
    if dst in (StageState.FAILED, StageState.CANCELLED):
        return src != StageState.DONE
    if src in (StageState.FAILED, StageState.CANCELLED):
        return True  # a resume picks up at whatever step the artifacts say is next
    if src == dst:
        return True
    return STAGE_STATES.index(dst) > STAGE_STATES.index(src)


class Manifest:
    """In-memory view of run.json; every mutation is saved before it returns."""

    def __init__(self, path: Path, data: RunRecord):
        self.path = path
        self.data = data
        # Called with the saved data after every save: the services mirror run.json
        # into their run store through it.
        self.on_save: Callable[[RunRecord], None] | None = None
        self.readonly = False  # DDP ranks other than 0 keep a copy but never write it
        # The services' tasks set this: False means the run moved on without this process
        # (it was resumed since), whose copy must then not overwrite run.json.
        self.still_current: Callable[[], bool] | None = None

    @classmethod
    def create(
        cls,
        path: Path,
        config: dict[str, Any],
        fingerprint: str,
        num_stages: int,
        run_id: str | None = None,
    ) -> Manifest:
        data: RunRecord = {
            "run_id": run_id or new_run_id(config["name"]),
            "name": config["name"],
            "status": RunStatus.PENDING,
            "created_at": now(),
            "updated_at": now(),
            "config_fingerprint": fingerprint,
            "config": config,
            "current_stage": 0,
            "error": None,
            "stages": [
                {
                    "stage": k,
                    "state": StageState.PENDING,
                    "transitions": [{"state": StageState.PENDING, "at": now()}],
                    "timings": {},
                    "metrics": {},
                    "error": None,
                }
                for k in range(num_stages)
            ],
        }
        m = cls(path, data)
        m.save()
        return m

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = _RUN_RECORD.validate_python(read_json(path))
        except ValidationError as e:
            raise ArtifactError(f"{path} is not a valid run manifest: {e}") from None
        return cls(path, data)

    def save(self) -> None:
        self.data["updated_at"] = now()
        if self.readonly:
            return
        if self.still_current is not None and not self.still_current():
            raise RunStateError(
                f"run {self.run_id} was resumed since this process opened it; "
                "its stale copy of the manifest is not written"
            )
        write_json(self.path, self.data)
        if self.on_save is not None:
            self.on_save(self.data)

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    def stage(self, k: int) -> StageRecord:
        return self.data["stages"][k]

    def next_stage(self) -> int:
        """The first stage not done (the number of stages when all are)."""
        states = [st["state"] for st in self.data["stages"]]
        return next((k for k, state in enumerate(states) if state != StageState.DONE), len(states))

    def moved_past(self, k: int, state: StageState) -> bool:
        """Stage k is already beyond `state` (a re-delivered task repeating an earlier step)."""
        now = self.stage(k)["state"]
        return now in STAGE_STATES and STAGE_STATES.index(now) > STAGE_STATES.index(state)

    def set_status(self, status: RunStatus, error: str | None = None) -> None:
        status = RunStatus(status)
        assert status in RUN_STATUSES, status
        self.data["status"] = status
        self.data["error"] = error
        self.save()

    def end(self, k: int, status: RunStatus, reason: str) -> None:
        """End stage k and the run `failed` or `cancelled` with the reason: the one place that
        does, for the embedded run and the services alike. A stage that already ended (done,
        e.g. when the export failed; or failed or cancelled) keeps its state; `k` is clamped
        to the run's stages."""
        if status not in (RunStatus.FAILED, RunStatus.CANCELLED):
            raise ValueError(f"a run ends failed or cancelled, not {status!r}")
        k = min(max(k, 0), len(self.data["stages"]) - 1)
        if self.stage(k)["state"] not in END_STATES:
            self.transition(k, StageState(status), reason)  # the stage ends as the run does
        cancelled = status == RunStatus.CANCELLED
        self.set_status(status, reason if cancelled else f"stage {k} failed: {reason}")

    def transition(self, k: int, state: StageState, error: str | None = None) -> None:
        state = StageState(state)  # a plain string from an untyped caller, or an unknown one
        st = self.stage(k)
        if not _allowed(st["state"], state):
            raise RunStateError(f"stage {k}: illegal transition {st['state']} -> {state}")
        if st["state"] != state:
            st["transitions"].append({"state": state, "at": now()})
        st["state"] = state
        st["error"] = error
        self.data["current_stage"] = k
        self.save()

    def add_timing(self, k: int, name: str, seconds: float) -> None:
        timings = self.stage(k)["timings"]
        timings[name] = round(timings.get(name, 0.0) + seconds, 3)
        self.save()

    def update_metrics(self, k: int, **metrics: Any) -> None:
        self.stage(k)["metrics"].update(metrics)
        self.save()
