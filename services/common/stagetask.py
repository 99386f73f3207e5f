"""What every stage task shares: the Celery base class and the checks before any work.

A stage task takes IDs (run, stage, [shard,] generation), is idempotent, and never waits
on another task. The base acknowledges late and retries transient errors with backoff; a
task that finally fails marks its stage and run failed, and so does a task delivered more
than `task_max_deliveries` times (each delivery killed its worker). While a delivery runs
it beats in the run store (`watchdog.Heartbeat`), so that its death is noticed.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from celery import Task

from mates.errors import ArtifactError
from mates.manifest import RunStatus, StageState
from mates.run import Cancelled, Run
from services.common.contracts import Outcome
from services.common.ending import record_failure
from services.common.errors import TRANSIENT
from services.common.settings import get_settings
from services.common.store import Store, default_store
from services.common.watchdog import Heartbeat

log = logging.getLogger(__name__)


class StageTask(Task):
    """Late acknowledgement, bounded retries with exponential backoff on transient errors,
    heartbeats, and a limit on deliveries. The retry settings are read when the task is
    bound to its app (in the worker), not when this module is imported."""

    acks_late = True
    autoretry_for = TRANSIENT

    @classmethod
    def bind(cls, app):
        s = get_settings()
        cls.retry_backoff = s.task_retry_backoff_s
        cls.retry_backoff_max = s.task_retry_backoff_max_s
        cls.retry_jitter = s.task_retry_jitter
        cls.max_retries = s.task_max_retries
        return super().bind(app)

    def __call__(self, *args, **kwargs):
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        if self.poisoned(*args):
            return Outcome.POISONED
        with self.heartbeat(*args):
            return super().__call__(*args, **kwargs)

    def heartbeat(self, run_id: str, stage: int, *rest: int) -> Heartbeat:
        """Beat in the run store while this delivery runs, so that its death is noticed."""
        generation, shard = rest[-1], (rest[0] if len(rest) == 2 else -1)
        return Heartbeat(
            default_store(),
            get_settings().heartbeat_s,
            self.request.id,
            run_id,
            generation,
            self.name,
            stage,
            shard,
        )

    def poisoned(self, run_id: str, stage: int, *rest: int) -> bool:
        """Count this delivery; past the limit, fail the run instead of running the task."""
        generation, shard = rest[-1], (rest[0] if len(rest) == 2 else -1)
        store = default_store()
        try:
            n = store.count_delivery(
                run_id, generation, self.name, stage, shard, self.request.retries
            )
        except TRANSIENT:  # the store is briefly down: run the task, it retries on its own
            return False
        limit = get_settings().task_max_deliveries
        if n <= limit:
            return False
        what = f"{self.name} of stage {stage}" + (f" shard {shard}" if shard >= 0 else "")
        reason = (
            f"{what} was delivered {n} times (MATES_TASK_MAX_DELIVERIES = {limit}) and "
            "never finished: each delivery lost its worker (killed, e.g. out of memory)"
        )
        log.error("run %s: %s; failing the run instead of redelivering it", run_id, reason)
        record_failure(store, run_id, stage, generation, reason)
        return True

    def on_failure(self, exc, task_id, args, kwargs, einfo):  # noqa: D401 - Celery hook
        run_id, stage, generation = args[0], args[1], args[-1]
        retried = self.request.retries
        after = f" (after {retried} retries)" if retried else ""
        try:
            record_failure(
                default_store(),
                run_id,
                stage,
                generation,
                f"{self.name}: {type(exc).__name__}: {exc}{after}",
            )
        except Exception:  # the original error is what Celery reports; do not mask it
            log.exception("could not record the failure of %s for run %s", self.name, run_id)


def open_run(store: Store, run_id: str, generation: int) -> Run:
    """The run's library object, mirroring every manifest change into the run store; its
    manifest refuses to write once the run has moved to a newer generation."""
    row = store.get_run(run_id)
    if row is None:
        raise ArtifactError(f"run {run_id} is not in the run store")
    run = Run.open(Path(row["artifacts_dir"]), progress=False)
    run.manifest.on_save = store.sync_manifest
    run.manifest.still_current = lambda: store.get_generation(run_id) == generation
    return run


@contextmanager
def wanted(run_id: str, stage: int, generation: int):
    """Yield the run if this task should still work on it, else None.

    A task from an older generation (the run was resumed since) is stale; a run with a
    cancel request is marked cancelled here, so a queued task ends it cleanly.
    """
    store = default_store()
    current = store.get_generation(run_id)
    if current != generation:
        log.info(
            "run %s stage %d: generation %d is stale (now %d); skipping",
            run_id,
            stage,
            generation,
            current,
        )
        yield None
        return
    run = open_run(store, run_id, generation)
    if (
        run.manifest.data["status"] == RunStatus.FAILED
    ):  # e.g. by a poisoned task; a resume bumps it
        log.info("run %s stage %d: the run failed meanwhile; skipping", run_id, stage)
        yield None
        return
    if run.paths.cancel.exists():
        if run.manifest.data["status"] != RunStatus.CANCELLED:
            run.mark_cancelled(stage)
        yield None
        return
    try:
        yield run
    except Cancelled:
        log.info("run %s stage %d cancelled", run_id, stage)


def stage_done(run: Run, stage: int) -> bool:
    return run.manifest.stage(stage)["state"] == StageState.DONE
