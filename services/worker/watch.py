"""The broker watch: notice a Redis that lost its queues, and fail the runs it stranded;
and end the runs whose task processes died (no heartbeat, see heartbeat.py).

A Redis restarted without persistence comes back empty: every queued and every
unacknowledged task is gone, and so are the chord counters of a stage's shards. No
task would ever wake those runs again, and the API would show them active forever.
So every worker and trainer keeps checking for a marker key in the broker whose value
the run store remembers. Marker missing while the store remembers one: the broker lost
its data. The one process whose `SET NX` puts a new marker there marks every run that
was waiting on the broker failed, with the reason, and bumps its generation so that a
task still running for it stops at its next write; one `POST /v1/runs/{id}/resume`
then continues the run from its last completed step. Stranded are the runs whose last task
was published before the restarted broker came up (Redis's uptime says when), not before
the tick that noticed: a run resumed in between is in the new broker and is spared. With persistence (AOF) the marker
survives and nothing is failed: the queues are back and unacknowledged tasks are
redelivered after the visibility timeout.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis

from services.common.settings import Settings
from services.common.store import Store
from services.worker.dispatch import end_run, end_silent_runs

log = logging.getLogger(__name__)

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


def loss_cutoff(client: redis.Redis, now: float, marker_seen_at: float | None) -> float:
    """When the broker lost its data, as a time on this host: when the restarted broker came
    up (`now` less its uptime, less the second that `uptime_in_seconds` truncates). A broker
    up since before this process last saw the marker was emptied in place (FLUSHALL): when
    is unknown, and `now` is the cut-off."""
    try:
        uptime = float(client.info("server")["uptime_in_seconds"])
    except (KeyError, TypeError, ValueError, redis.ResponseError):
        return now
    if marker_seen_at is not None and now - uptime < marker_seen_at:
        return now
    return now - uptime - 1.0


def fail_stranded_runs(store: Store, since: float) -> list[str]:
    """Fail (or, if a cancel was asked, cancel) each active run whose last task was published
    before `since`, when the broker was found empty; returns their IDs."""
    ended = []
    for status in WAITING_ON_BROKER:
        for row in store.list_runs(status=status, limit=100_000):
            sent = store.last_sent_at(row["id"])
            if sent is not None and sent >= since:
                continue  # published into the new broker: its task is there
            end_run(store, row["id"], "cancelled" if status == "cancelling" else "failed", REASON)
            ended.append(row["id"])
    return ended


def watch(settings: Settings, store: Store, stop: threading.Event) -> None:
    """Every `broker_watch_s` until `stop` is set: check the broker (a Redis one), and end
    the runs whose tasks' processes stopped beating (heartbeat.py)."""
    client = None
    marker_seen_at = None  # when this process last found the marker in the broker
    if settings.broker_url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2,
                                      socket_timeout=2)
    while True:
        try:
            checked_at = time.time()
            if client is not None and broker_lost(client, store):
                since = loss_cutoff(client, time.time(), marker_seen_at)
                ended = fail_stranded_runs(store, since=since)
                log.warning("the broker lost its queued tasks; runs ended (resume them): %s",
                            ", ".join(ended) or "none")
            elif client is not None:
                marker_seen_at = checked_at
        except (redis.RedisError, OSError):
            pass  # the broker is down: check again once it is back
        except Exception:  # the store is down, a run dir is unreadable: log, keep watching
            log.exception("broker watch: check failed")
        try:
            end_silent_runs(store, settings)
        except Exception:
            log.exception("heartbeat watch: check failed")
        if stop.wait(settings.broker_watch_s):
            return


def start(settings: Settings, store: Store) -> threading.Event:
    """Start the watch in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=watch, args=(settings, store, stop), name="broker-watch",
                     daemon=True).start()
    return stop
