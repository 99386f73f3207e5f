"""The run manifest (`run.json`) and the stage state machine.

`pending → training → probing → fitting → scoring → selecting → done`, with
`failed` and `cancelled` reachable from any active state. Every transition is
recorded with a timestamp; the manifest is rewritten atomically on each change.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mates.artifacts import read_json, write_json
from mates.errors import RunStateError

STAGE_STATES = ("pending", "training", "probing", "fitting", "scoring", "selecting", "done")
END_STATES = ("done", "failed", "cancelled")
RUN_STATUSES = ("pending", "queued", "running", "done", "failed", "cancelled")


def now() -> float:
    return round(time.time(), 3)


def new_run_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _allowed(src: str, dst: str) -> bool:
    if dst in ("failed", "cancelled"):
        return src not in ("done",)
    if src in ("failed", "cancelled"):
        return True  # a resume picks up at whatever step the artifacts say is next
    if src == dst:
        return True
    return STAGE_STATES.index(dst) > STAGE_STATES.index(src)


class Manifest:
    """In-memory view of run.json; every mutation is saved before it returns."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data
        # Called with the saved data after every save: the services mirror run.json
        # into their run store through it.
        self.on_save: Callable[[dict[str, Any]], None] | None = None
        self.readonly = False  # DDP ranks other than 0 keep a copy but never write it
        # The services' tasks set this: False means the run moved on without this process
        # (it was resumed since), whose copy must then not overwrite run.json.
        self.still_current: Callable[[], bool] | None = None

    @classmethod
    def create(
        cls,
        path: Path,
        config: dict,
        fingerprint: str,
        num_stages: int,
        extra: dict | None = None,
        run_id: str | None = None,
    ) -> Manifest:
        data = {
            "run_id": run_id or new_run_id(config["name"]),
            "name": config["name"],
            "status": "pending",
            "created_at": now(),
            "updated_at": now(),
            "config_fingerprint": fingerprint,
            "config": config,
            "current_stage": 0,
            "error": None,
            "stages": [
                {
                    "stage": k,
                    "state": "pending",
                    "transitions": [{"state": "pending", "at": now()}],
                    "timings": {},
                    "metrics": {},
                    "error": None,
                }
                for k in range(num_stages)
            ],
            **(extra or {}),
        }
        m = cls(path, data)
        m.save()
        return m

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls(path, read_json(path))

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

    def stage(self, k: int) -> dict[str, Any]:
        return self.data["stages"][k]

    def next_stage(self) -> int:
        """The first stage not done (the number of stages when all are)."""
        states = [st["state"] for st in self.data["stages"]]
        return next((k for k, state in enumerate(states) if state != "done"), len(states))

    def moved_past(self, k: int, state: str) -> bool:
        """Stage k is already beyond `state` (a re-delivered task repeating an earlier step)."""
        now = self.stage(k)["state"]
        return now in STAGE_STATES and STAGE_STATES.index(now) > STAGE_STATES.index(state)

    def set_status(self, status: str, error: str | None = None) -> None:
        assert status in RUN_STATUSES, status
        self.data["status"] = status
        self.data["error"] = error
        self.save()

    def end(self, k: int, status: str, reason: str) -> None:
        """End stage k and the run `failed` or `cancelled` with the reason: the one place that
        does, for the embedded run and the services alike. A stage that already ended (done,
        e.g. when the export failed; or failed or cancelled) keeps its state; `k` is clamped
        to the run's stages."""
        if status not in ("failed", "cancelled"):
            raise ValueError(f"a run ends failed or cancelled, not {status!r}")
        k = min(max(k, 0), len(self.data["stages"]) - 1)
        if self.stage(k)["state"] not in END_STATES:
            self.transition(k, status, reason)
        self.set_status(status, reason if status == "cancelled" else f"stage {k} failed: {reason}")

    def transition(self, k: int, state: str, error: str | None = None) -> None:
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
