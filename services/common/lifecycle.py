"""A run's life as the API drives it: create, cancel, resume; ending is `ending.end_run`.

Shared by the API and the tasks. Creating and resuming queue the run's next stage through
`queue.enqueue` (claimed once per generation); cancelling writes the request where the
worker holding the run reads it at its next step. A run whose process died (no heartbeat,
see `watchdog`) is ended here at once rather than waiting for the watch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mates.artifacts import RunPaths
from mates.config import RunConfig
from mates.errors import RunStateError
from mates.manifest import Manifest, RunStatus
from mates.run import init_run
from services.common.contracts import ACTIVE, CANCELLING, RESUMABLE, WAITING_ON_BROKER
from services.common.ending import stored_manifest
from services.common.errors import BrokerUnavailable
from services.common.queue import enqueue
from services.common.settings import Settings
from services.common.store import Store
from services.common.store.records import RunDetail
from services.common.watchdog import check_broker_of, end_silent_runs

log = logging.getLogger(__name__)


def _queue_from_next_stage(
    store: Store, settings: Settings, manifest: Manifest, generation: int
) -> None:
    run_id = manifest.run_id
    manifest.on_save = store.sync_manifest
    manifest.set_status(RunStatus.QUEUED)
    # all stages done but the run is not (its export failed): the last stage's job finishes it
    stage = min(manifest.next_stage(), len(manifest.data["stages"]) - 1)
    try:
        enqueue(settings, store, run_id, "train_stage", stage, generation)
    except BrokerUnavailable as e:
        manifest.set_status(RunStatus.FAILED, str(e))
        raise BrokerUnavailable(
            f"{e}; run {run_id} is recorded failed: resume it "
            f"(POST /v1/runs/{run_id}/resume) once the broker is back"
        ) from e


def create_run(store: Store, settings: Settings, cfg: RunConfig) -> RunDetail:
    """Make the run directory and store row, and enqueue stage 0's training."""
    manifest = init_run(cfg, settings.artifacts_dir)
    store.create_run(manifest.data, str(manifest.path.parent.resolve()))
    _queue_from_next_stage(store, settings, manifest, store.bump_generation(manifest.run_id))
    return _get(store, manifest.run_id)


def cancel_run(store: Store, settings: Settings, run_id: str) -> RunDetail:
    """Ask a run to stop: the worker holding it stops at its next step (or a queued task
    finds the request when it starts) and records the cancellation. A run whose process
    died (no heartbeat) has nobody to read the request: it is cancelled here and now."""
    row = _get(store, run_id)
    if end_silent_runs(store, settings, run_id, cancel=True):
        return _get(store, run_id)
    if not store.set_status_if(run_id, CANCELLING, ACTIVE):  # atomic: no race with a worker
        status = _get(store, run_id)["status"]
        raise RunStateError(f"run {run_id} is {status}; only an active run can be cancelled")
    RunPaths(Path(row["artifacts_dir"])).cancel.write_text(
        "cancel requested through the API\n", encoding="utf-8"
    )
    return _get(store, run_id)


def resume_run(store: Store, settings: Settings, run_id: str) -> RunDetail:
    """Continue a failed or cancelled run from its last completed step; an active run whose
    process died (no heartbeat) is failed first, so it need not wait for the watch."""
    row = _get(store, run_id)
    end_silent_runs(store, settings, run_id)
    check_broker_of(settings, store)  # first: a loss found by the enqueue below would end this run
    if not store.set_status_if(run_id, RunStatus.QUEUED, RESUMABLE):  # one resume wins
        status = _get(store, run_id)["status"]
        raise RunStateError(
            f"run {run_id} is {status}; only a failed or cancelled run can be resumed"
        )
    generation = store.bump_generation(run_id)  # first: tasks of the old generation now stop
    RunPaths(Path(row["artifacts_dir"])).cancel.unlink(missing_ok=True)
    _queue_from_next_stage(store, settings, stored_manifest(store, row), generation)
    return _get(store, run_id)


RESCUED = {"score_shard": "select"}
"""A stage's shards are a chord: their `select` scores whatever shard is missing itself."""


def rescue_stalled_runs(settings: Settings, store: Store) -> list[str]:
    """Publish again, once per generation, the task an active run waits for when its message
    was lost: a worker or Redis died between taking it from its queue and recording it as
    unacknowledged (kombu's Redis transport has that gap), so no redelivery will come.

    A run counts as stalled when nothing of its generation runs (no heartbeat row, not even
    a dead one: those are `end_silent_runs`'), its latest task was published more than
    `stall_s` ago, and no task of it was delivered since `stall_s` ago. Its IDs."""
    cutoff = time.time() - settings.stall_s
    rescued = []
    for status in WAITING_ON_BROKER:
        for row in store.list_runs(status=status, limit=100_000):
            run_id, generation = row["id"], row["generation"]
            last = store.last_dispatch(run_id, generation)
            if last is None or last["sent_at"] is None or last["sent_at"] > cutoff:
                continue
            if last["task"].startswith("rescue:"):
                continue  # rescued once already in this generation
            delivered = store.last_delivery_at(run_id, generation)
            if delivered is not None and delivered > cutoff:
                continue
            if any(b["generation"] == generation for b in store.list_heartbeats(run_id)):
                continue
            task = RESCUED.get(last["task"], last["task"])
            if enqueue(
                settings, store, run_id, task, last["stage"], generation, claim_as=f"rescue:{task}"
            ):
                log.warning(
                    "run %s: nothing of generation %d ran or was delivered for %.0f s "
                    "after %s of stage %d was published (its message was lost?); "
                    "published %s again",
                    run_id,
                    generation,
                    settings.stall_s,
                    last["task"],
                    last["stage"],
                    task,
                )
                rescued.append(run_id)
    return rescued


def _get(store: Store, run_id: str) -> RunDetail:
    row = store.get_run(run_id)
    if row is None:
        raise KeyError(run_id)
    return row
