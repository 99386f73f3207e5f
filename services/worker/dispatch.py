"""Run control shared by the API and the tasks: create, cancel, resume, enqueue.

A run's tasks carry its *generation*; resuming bumps it, so a task left over from
before a cancel or failure finds itself stale and does nothing. Every enqueue is
claimed in the run store first (run, generation, task, stage), so a re-delivered
task never enqueues its downstream work twice.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from pathlib import Path

import redis

from mates.artifacts import RunPaths
from mates.config import RunConfig
from mates.errors import MatesError, RunStateError
from mates.manifest import Manifest
from mates.run import init_run
from services.common.settings import Settings
from services.common.store import Store

log = logging.getLogger(__name__)

ACTIVE = ("pending", "queued", "running")
RESUMABLE = ("failed", "cancelled")


class BrokerUnavailable(MatesError):
    """The broker did not take a task; the run is marked failed and can be resumed."""


class PublishPending(MatesError):
    """Another process claimed this enqueue and has not confirmed it yet."""


# Publishing fails fast when the broker is down: a caller (an HTTP request, a task) must
# not hang; a run left without its next task is marked failed, so it can be resumed.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def claim(store: Store, run_id: str, generation: int, task: str, stage: int) -> bool:
    """True: publish `task` now. False: it was published already. PublishPending: another
    process claimed it and has not confirmed yet (retry later: a dead claimer's claim goes
    stale and is taken over)."""
    if store.claim_dispatch(run_id, generation, task, stage):
        return True
    if store.dispatch_sent(run_id, generation, task, stage):
        log.info("%s %s stage %d (generation %d) was already enqueued", task, run_id, stage,
                 generation)
        return False
    raise PublishPending(f"{task} of run {run_id} stage {stage} is claimed but not yet sent")


def enqueue(settings: Settings, store: Store, run_id: str, task: str, stage: int, generation: int,
            *args: int) -> bool:
    """Send `mates.<task>` once per (run, generation, task, stage); False if already sent.

    Raises BrokerUnavailable when publishing fails, PublishPending as `claim` does.
    """
    from services.worker.celery_app import app_for

    check_broker_of(settings, store)  # a loss is claimed before anything goes into the new broker
    if not claim(store, run_id, generation, task, stage):
        return False
    try:
        app_for(settings).send_task(f"mates.{task}", args=(run_id, stage, *args, generation),
                                    retry=True, retry_policy=PUBLISH_RETRY, ignore_result=True)
    except Exception as e:  # kombu/redis raise many types for "broker unreachable"
        raise BrokerUnavailable(
            f"could not enqueue {task} of run {run_id} stage {stage}: {type(e).__name__}: {e}") from e
    store.mark_sent(run_id, generation, task, stage)
    return True


def _queue_from_next_stage(store: Store, settings: Settings, manifest: Manifest,
                           generation: int) -> None:
    run_id = manifest.run_id
    manifest.on_save = store.sync_manifest
    manifest.set_status("queued")
    # all stages done but the run is not (its export failed): the last stage's job finishes it
    stage = min(manifest.next_stage(), len(manifest.data["stages"]) - 1)
    try:
        enqueue(settings, store, run_id, "train_stage", stage, generation)
    except BrokerUnavailable as e:
        manifest.set_status("failed", str(e))
        raise BrokerUnavailable(f"{e}; run {run_id} is recorded failed: resume it "
                                f"(POST /v1/runs/{run_id}/resume) once the broker is back") from e


def create_run(store: Store, settings: Settings, cfg: RunConfig) -> dict:
    """Make the run directory and store row, and enqueue stage 0's training."""
    manifest = init_run(cfg, settings.artifacts_dir)
    store.create_run(manifest.data, str(manifest.path.parent.resolve()))
    _queue_from_next_stage(store, settings, manifest, store.bump_generation(manifest.run_id))
    return store.get_run(manifest.run_id)


def cancel_run(store: Store, settings: Settings, run_id: str) -> dict:
    """Ask a run to stop: the worker holding it stops at its next step (or a queued task
    finds the request when it starts) and records the cancellation. A run whose process
    died (no heartbeat) has nobody to read the request: it is cancelled here and now."""
    row = _get(store, run_id)
    if end_silent_runs(store, settings, run_id, cancel=True):
        return store.get_run(run_id)
    if not store.set_status_if(run_id, "cancelling", ACTIVE):  # atomic: no race with a worker
        status = _get(store, run_id)["status"]
        raise RunStateError(f"run {run_id} is {status}; only an active run can be cancelled")
    RunPaths(Path(row["artifacts_dir"])).cancel.write_text("cancel requested through the API\n",
                                                          encoding="utf-8")
    return store.get_run(run_id)


def resume_run(store: Store, settings: Settings, run_id: str) -> dict:
    """Continue a failed or cancelled run from its last completed step; an active run whose
    process died (no heartbeat) is failed first, so it need not wait for the watch."""
    row = _get(store, run_id)
    end_silent_runs(store, settings, run_id)
    check_broker_of(settings, store)  # first: a loss found by the enqueue below would end this run
    if not store.set_status_if(run_id, "queued", RESUMABLE):  # one resume wins
        status = _get(store, run_id)["status"]
        raise RunStateError(
            f"run {run_id} is {status}; only a failed or cancelled run can be resumed")
    generation = store.bump_generation(run_id)  # first: tasks of the old generation now stop
    paths = RunPaths(Path(row["artifacts_dir"]))
    paths.cancel.unlink(missing_ok=True)
    _queue_from_next_stage(store, settings, Manifest.load(paths.manifest), generation)
    return store.get_run(run_id)


# --------------------------------------------------------------------------- a broker that lost its data
#
# A Redis restarted without persistence comes back empty (see watch.py). The broker holds a
# marker key whose value the run store remembers; marker missing while the store remembers
# one: the broker lost its data. Whoever first finds that (`SET NX`) claims the loss and ends
# the runs whose last task was published before the claim. Every publish checks first, so a
# task published into the new broker is always published after the claim, and spared.

MARKER = "mates:broker-marker"
WAITING_ON_BROKER = ("queued", "running", "cancelling")
REASON = ("the broker (Redis) lost its queued tasks (restarted without persistence?) while "
          "this run was active; resume it to continue from its last completed step")


def broker_lost(client: redis.Redis, store: Store) -> bool:
    """True exactly once per loss of the broker's data, in the process that claims it."""
    remembered = store.get_state(MARKER)
    current = client.get(MARKER)
    if current is not None:
        if remembered is None:  # a fresh run store next to a broker that kept its data
            store.put_state(MARKER, current.decode())
        return False
    token = uuid.uuid4().hex
    if not client.set(MARKER, token, nx=True):
        return False  # another process claimed this loss
    store.put_state(MARKER, token)
    return remembered is not None  # no marker ever: a first deployment, nothing was lost


def fail_stranded_runs(store: Store, since: float) -> list[str]:
    """Fail (or, if a cancel was asked, cancel) each active run whose current generation's
    latest task was claimed for publishing before `since`, when the broker came up empty;
    returns their IDs.

    Spared: a run whose current generation claimed a task at or after `since` (it went into
    the new broker), or none yet (its publish, still to come, lands in the new broker or
    fails and fails the run itself). A run is ended only in the generation it was listed
    in, so one resumed meanwhile (a new generation) is left alone."""
    ended = []
    for status in WAITING_ON_BROKER:
        for row in store.list_runs(status=status, limit=100_000):
            generation = row["generation"]
            claimed = store.last_dispatch_at(row["id"], generation)
            if claimed is None or claimed >= since:
                continue
            if end_run(store, row["id"], "cancelled" if status == "cancelling" else "failed",
                       REASON, generation=generation):
                ended.append(row["id"])
    return ended


def broker_started_at(client: redis.Redis) -> float:
    """When the broker (Redis) last started, by its own clock: `TIME` less `uptime_in_seconds`.

    The uptime counts whole seconds, so this is up to a second after the true start: a task
    published in the broker's first second may be taken for lost (its run fails,
    resumably), never a lost one for published."""
    seconds, micros = client.time()
    return seconds + micros / 1e6 - float(client.info("server")["uptime_in_seconds"])


def check_broker(client: redis.Redis, store: Store) -> list[str]:
    """Claim a loss of the broker's data if there is one, and end the runs it stranded: those
    whose current generation's latest task was claimed before the emptied broker came up.
    The cut-off is the broker's start, not the moment a check noticed the loss, so a run
    resumed into the new broker before that check is not failed by it. Their IDs."""
    if not broker_lost(client, store):
        return []
    ended = fail_stranded_runs(store, since=broker_started_at(client))
    log.warning("the broker lost its queued tasks; runs ended (resume them): %s",
                ", ".join(ended) or "none")
    return ended


@functools.cache
def _broker_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def check_broker_of(settings: Settings, store: Store) -> None:
    """`check_broker` on a Redis broker; unreachable, it is left to the publish to fail."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return
    try:
        check_broker(_broker_client(settings.broker_url), store)
    except (redis.RedisError, OSError):
        pass


def end_run(store: Store, run_id: str, status: str, reason: str,
            generation: int | None = None) -> bool:
    """End an active run from outside its tasks: a task still running for it goes stale.

    With `generation`, only if the run is still in it (of several processes ending the same
    run, one does); False if it had moved on."""
    row = _get(store, run_id)
    if generation is None:
        store.bump_generation(run_id)
    elif not store.bump_generation_from(run_id, generation):
        return False
    manifest = Manifest.load(RunPaths(Path(row["artifacts_dir"])).manifest)
    manifest.on_save = store.sync_manifest
    k = int(manifest.data["current_stage"])
    if manifest.stage(k)["state"] not in ("done", "failed", "cancelled"):
        manifest.transition(k, status, reason)
    manifest.set_status(status, reason if status == "cancelled" else f"stage {k} failed: {reason}")
    return True


WHAT_STOPPED = {"mates.train_stage": ("training", "the trainer"),
                "mates.fit_influence_model": ("the influence-model fit", "the worker"),
                "mates.score_shard": ("scoring", "the worker"),
                "mates.select": ("selection", "the worker")}


def silent_reason(silent: dict, now: float, status: str) -> str:
    what, who = WHAT_STOPPED.get(silent["task"], (silent["task"], "its worker"))
    if silent["shard"] >= 0:
        what += f" of shard {silent['shard']}"
    why = (f"{what} stopped: no heartbeat from its process ({silent['worker']}) for "
           f"{now - silent['beat_at']:.0f} s ({who} was killed or lost?)")
    if status == "cancelled":
        return f"cancelled; {why}"
    return f"{why}; resume to continue from the last checkpoint"


def end_silent_runs(store: Store, settings: Settings, run_id: str | None = None,
                    cancel: bool = False) -> list[str]:
    """End each active run (or just `run_id`) whose started tasks have all been silent for
    `heartbeat_timeout_s`: failed, or cancelled if a cancel was asked (or `cancel`); its
    generation is bumped, so a task of it that was merely frozen does nothing more."""
    now = time.time()
    ended = []
    for silent in store.silent_runs(now - settings.heartbeat_timeout_s, run_id):
        status = "cancelled" if cancel or silent["status"] == "cancelling" else "failed"
        reason = silent_reason(silent, now, status)
        if end_run(store, silent["run_id"], status, reason, generation=silent["generation"]):
            store.clear_heartbeats(silent["run_id"], below_generation=silent["generation"] + 1)
            log.warning("run %s %s: %s", silent["run_id"], status, reason)
            ended.append(silent["run_id"])
    return ended


def _get(store: Store, run_id: str) -> dict:
    row = store.get_run(run_id)
    if row is None:
        raise KeyError(run_id)
    return row
