"""Run control shared by the API and the tasks: create, cancel, resume, enqueue.

A run's tasks carry its *generation*; resuming bumps it, so a task left over from
before a cancel or failure finds itself stale and does nothing. Every enqueue is
claimed in the run store first (run, generation, task, stage), so a re-delivered
task never enqueues its downstream work twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mates.artifacts import RunPaths
from mates.config import RunConfig
from mates.errors import RunStateError
from mates.manifest import Manifest
from mates.run import init_run
from services.common.settings import Settings
from services.common.store import Store

log = logging.getLogger(__name__)

ACTIVE = ("pending", "queued", "running")
RESUMABLE = ("failed", "cancelled")


def enqueue(store: Store, run_id: str, task: str, stage: int, generation: int,
            *args: int) -> bool:
    """Send `mates.<task>` once per (run, generation, task, stage); False if already sent."""
    from services.worker.celery_app import app

    if not store.claim_dispatch(run_id, generation, task, stage):
        log.info("%s %s stage %d (generation %d) was already enqueued", task, run_id, stage, generation)
        return False
    app.send_task(f"mates.{task}", args=(run_id, stage, *args, generation))
    return True


def _queue_from_next_stage(store: Store, manifest: Manifest) -> None:
    run_id = manifest.run_id
    generation = store.bump_generation(run_id)
    manifest.on_save = store.sync_manifest
    manifest.set_status("queued")
    enqueue(store, run_id, "train_stage", manifest.next_stage(), generation)


def create_run(store: Store, settings: Settings, cfg: RunConfig) -> dict:
    """Make the run directory and store row, and enqueue stage 0's training."""
    manifest = init_run(cfg, settings.artifacts_dir)
    store.create_run(manifest.data, str(manifest.path.parent.resolve()))
    _queue_from_next_stage(store, manifest)
    return store.get_run(manifest.run_id)


def cancel_run(store: Store, settings: Settings, run_id: str) -> dict:
    """Ask a run to stop: the worker holding it stops at its next step (or a queued task
    finds the request when it starts) and records the cancellation."""
    row = _get(store, run_id)
    if row["status"] not in ACTIVE:
        raise RunStateError(f"run {run_id} is {row['status']}; only an active run can be cancelled")
    paths = RunPaths(Path(row["artifacts_dir"]))
    paths.cancel.write_text("cancel requested through the API\n", encoding="utf-8")
    store.set_status(run_id, "cancelling")
    return store.get_run(run_id)


def resume_run(store: Store, settings: Settings, run_id: str) -> dict:
    """Continue a failed or cancelled run from its last completed step."""
    row = _get(store, run_id)
    if row["status"] not in RESUMABLE:
        raise RunStateError(
            f"run {run_id} is {row['status']}; only a failed or cancelled run can be resumed")
    paths = RunPaths(Path(row["artifacts_dir"]))
    paths.cancel.unlink(missing_ok=True)
    _queue_from_next_stage(store, Manifest.load(paths.manifest))
    return store.get_run(run_id)


def _get(store: Store, run_id: str) -> dict:
    row = store.get_run(run_id)
    if row is None:
        raise KeyError(run_id)
    return row
