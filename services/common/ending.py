"""Ending a run from a service process, in the run store and in its `run.json` alike.

The stage and run states themselves change in one place, `Manifest.end` (the library's,
which the embedded run uses too); here is what a service adds around it: which
generation of the run may end it, and mirroring every write into the run store.
"""

from __future__ import annotations

from pathlib import Path

from mates.artifacts import RunPaths
from mates.manifest import Manifest, RunStatus
from services.common.contracts import FINAL
from services.common.store import Store
from services.common.store.records import RunRow


def stored_manifest(store: Store, row: RunRow) -> Manifest:
    """The run's manifest, every save mirrored into the run store."""
    manifest = Manifest.load(RunPaths(Path(row["artifacts_dir"])).manifest)
    manifest.on_save = store.sync_manifest
    return manifest


def end_run(
    store: Store, run_id: str, status: RunStatus, reason: str, generation: int | None = None
) -> bool:
    """End an active run from outside its tasks, at its current stage: a task still running
    for it goes stale (its generation is bumped).

    With `generation`, only if the run is still in it (of several processes ending the same
    run, one does; a run resumed meanwhile is left alone); False if it had moved on."""
    row = store.get_run(run_id)
    if row is None:
        raise KeyError(run_id)
    if generation is None:
        store.bump_generation(run_id)
    elif not store.bump_generation_from(run_id, generation):
        return False
    manifest = stored_manifest(store, row)
    manifest.end(int(manifest.data["current_stage"]), status, reason)
    return True


def record_failure(store: Store, run_id: str, stage: int, generation: int, reason: str) -> None:
    """A task of `generation` failed for good: mark its stage and the run failed, unless the
    run moved on (resumed since, or already ended). Works where the run cannot be opened
    (e.g. its config asks for a device this worker lacks)."""
    row = store.get_run(run_id)
    if row is None or row["generation"] != generation:
        return
    try:
        manifest = stored_manifest(store, row)
    except Exception as e:  # run.json itself is unreadable: the store still records it
        store.set_status(run_id, RunStatus.FAILED, f"{reason}; run.json unreadable: {e}")
        return
    if manifest.data["status"] in FINAL:
        return
    manifest.end(stage, RunStatus.FAILED, reason)
