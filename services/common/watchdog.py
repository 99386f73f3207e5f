"""The watchdog: notice a broker that lost its data, and runs whose processes died.

The broker marker. A Redis restarted without persistence comes back empty: every queued
and every unacknowledged task is gone, and so are the chord counters of a stage's shards.
No task would ever wake those runs again, and the API would show them active forever. So
every worker and trainer keeps checking for a marker key in the broker whose value the run
store remembers. Marker missing while the store remembers one: the broker lost its data.
The one process whose `SET NX` puts a new marker there marks every run that was waiting on
the broker failed, with the reason, and bumps its generation so that a task still running
for it stops at its next write; one `POST /v1/runs/{id}/resume` then continues the run from
its last completed step. Stranded are the runs whose current generation's latest task was
claimed before the emptied broker came up (by its own clock: `TIME` less its uptime), not
before the moment a check noticed: a run resumed into the new broker before the first
check is spared, whichever process notices the loss and however late. A run is ended only
in the generation it was listed in, so one resumed while a check runs is left alone. Every
publish checks the marker first (`queue.enqueue`, and resume before it re-queues a run), so
a loss is noticed at the latest by the next publish. With persistence (AOF) the marker
survives and nothing is failed: the queues are back and unacknowledged tasks are
redelivered after the visibility timeout.

Heartbeats. A task whose process is SIGKILLed (OOM killer, a lost machine) is redelivered
only after the broker's visibility timeout (a day by default), and until then its run stays
active with nothing working on it. So while a stage task runs, a daemon thread of its
process refreshes the task's row in the run store every `heartbeat_s`, and the row is
deleted when the task ends, whichever way. A row that stopped beating `heartbeat_timeout_s`
ago belongs to a dead process: `end_silent_runs` (called by the watch of every worker and
trainer, and by cancel and resume) ends its run, resumable.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import redis

from mates.manifest import RunStatus
from services.common.contracts import WAITING_ON_BROKER
from services.common.ending import end_run
from services.common.settings import Settings
from services.common.store import Store
from services.common.store.records import TaskBeat

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- broker marker

MARKER = "mates:broker-marker"
REASON = (
    "the broker (Redis) lost its queued tasks (restarted without persistence?) while "
    "this run was active; resume it to continue from its last completed step"
)


def broker_lost(client: redis.Redis, store: Store) -> bool:
    """True exactly once per loss of the broker's data, in the process that claims it."""
    remembered = store.get_state(MARKER)
    current = client.get(MARKER)
    if current is not None:
        if remembered is None:  # a fresh run store next to a broker that kept its data
            store.put_state(MARKER, current.decode() if isinstance(current, bytes) else current)
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
            if end_run(
                store,
                row["id"],
                RunStatus.CANCELLED if status == RunStatus.CANCELLING else RunStatus.FAILED,
                REASON,
                generation=generation,
            ):
                ended.append(row["id"])
    return ended


def broker_started_at(client: redis.Redis) -> float:
    """The latest moment the broker (Redis) can have started, by its own clock: `TIME` less
    `uptime_in_seconds`, plus a second.

    Redis counts its uptime in whole seconds from a start time it floors to the second, so
    `TIME` less the uptime lands up to a second before the true start (measured: 0.8 s
    before it, 0.2 s after a restart) and never more than a second before. A second later is
    never before the start: a task published before the restart is never taken for one
    published after it (its run would stay active with nothing queued); one published in
    the broker's first two seconds may be taken for lost (its run fails, resumably)."""
    seconds, micros = client.time()
    return seconds + micros / 1e6 - float(client.info("server")["uptime_in_seconds"]) + 1.0


def check_broker(client: redis.Redis, store: Store) -> list[str]:
    """Claim a loss of the broker's data if there is one, and end the runs it stranded: those
    whose current generation's latest task was claimed before the emptied broker came up.
    The cut-off is the broker's start, not the moment a check noticed the loss, so a run
    resumed into the new broker before that check is not failed by it. Their IDs."""
    if not broker_lost(client, store):
        return []
    ended = fail_stranded_runs(store, since=broker_started_at(client))
    log.warning(
        "the broker lost its queued tasks; runs ended (resume them): %s", ", ".join(ended) or "none"
    )
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


# --------------------------------------------------------------------------- heartbeats


class Heartbeat:
    """`with Heartbeat(...):` beats for one task while the block runs. Store errors are
    logged and retried at the next beat: the heartbeat never fails the task."""

    def __init__(
        self,
        store: Store,
        every_s: float,
        task_id: str,
        run_id: str,
        generation: int,
        task: str,
        stage: int,
        shard: int = -1,
    ):
        self.store, self.every_s, self.task_id = store, every_s, task_id
        self.row: TaskBeat = {
            "run_id": run_id,
            "generation": generation,
            "task": task,
            "stage": stage,
            "shard": shard,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{task_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._beat()  # at once: the task counts as started from its first step
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.store.end_beat(self.task_id)
        except Exception:  # the row goes stale; the next run of the task replaces it
            log.warning(
                "heartbeat of task %s: could not delete its row", self.task_id, exc_info=True
            )

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._beat()

    def _beat(self) -> None:
        try:
            self.store.beat(self.task_id, **self.row)
        except Exception:  # a busy or briefly absent store: the next beat tries again
            log.warning(
                "heartbeat of task %s (run %s): store write failed",
                self.task_id,
                self.row["run_id"],
                exc_info=True,
            )


WHAT_STOPPED = {
    "mates.train_stage": ("training", "the trainer"),
    "mates.fit_influence_model": ("the influence-model fit", "the worker"),
    "mates.score_shard": ("scoring", "the worker"),
    "mates.select": ("selection", "the worker"),
}


def silent_reason(silent: dict, now: float, status: RunStatus) -> str:
    what, who = WHAT_STOPPED.get(silent["task"], (silent["task"], "its worker"))
    if silent["shard"] >= 0:
        what += f" of shard {silent['shard']}"
    why = (
        f"{what} stopped: no heartbeat from its process ({silent['worker']}) for "
        f"{now - silent['beat_at']:.0f} s ({who} was killed or lost?)"
    )
    if status == RunStatus.CANCELLED:
        return f"cancelled; {why}"
    return f"{why}; resume to continue from the last checkpoint"


def end_silent_runs(
    store: Store, settings: Settings, run_id: str | None = None, cancel: bool = False
) -> list[str]:
    """End each active run (or just `run_id`) whose started tasks have all been silent for
    `heartbeat_timeout_s`: failed, or cancelled if a cancel was asked (or `cancel`); its
    generation is bumped, so a task of it that was merely frozen does nothing more."""
    now = time.time()
    ended = []
    for silent in store.silent_runs(now - settings.heartbeat_timeout_s, run_id):
        cancelled = cancel or silent["status"] == RunStatus.CANCELLING
        status = RunStatus.CANCELLED if cancelled else RunStatus.FAILED
        reason = silent_reason(silent, now, status)
        if end_run(store, silent["run_id"], status, reason, generation=silent["generation"]):
            store.clear_heartbeats(silent["run_id"], below_generation=silent["generation"] + 1)
            log.warning("run %s %s: %s", silent["run_id"], status, reason)
            ended.append(silent["run_id"])
    return ended


# --------------------------------------------------------------------------- the watch loop


def watch(
    settings: Settings,
    store: Store,
    stop: threading.Event,
    also: tuple[Callable[[Settings, Store], object], ...] = (),
) -> None:
    """Every `broker_watch_s` until `stop` is set: check the broker (a Redis one), end the
    runs whose tasks' processes stopped beating (`Heartbeat`), then run each of `also`."""
    client = None
    if settings.broker_url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=2
        )
    while True:
        try:
            if client is not None:
                check_broker(client, store)
        except (redis.RedisError, OSError):
            pass  # the broker is down: check again once it is back
        except Exception:  # the store is down, a run dir is unreadable: log, keep watching
            log.exception("broker watch: check failed")
        try:
            end_silent_runs(store, settings)
        except Exception:
            log.exception("heartbeat watch: check failed")
        for check in also:
            try:
                check(settings, store)
            except Exception:  # the broker or store is down: the next tick tries again
                log.exception("watch: %s failed", getattr(check, "__name__", check))
        if stop.wait(settings.broker_watch_s):
            return


def start_watch(
    settings: Settings, store: Store, also: tuple[Callable[[Settings, Store], object], ...] = ()
) -> threading.Event:
    """Start the watch in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(
        target=watch, args=(settings, store, stop, also), name="broker-watch", daemon=True
    ).start()
    return stop
