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
then continues the run from its last completed step. Stranded are the runs whose current
generation's latest task was claimed before the emptied broker came up (its own clock:
`TIME` less its uptime), not before the moment a check noticed: a run resumed into the new
broker before the first check is spared, whichever process notices the loss and however
late. A run is ended only in the generation it was listed in, so one resumed while a check
runs is left alone. Every publish still checks the marker first (dispatch.enqueue, and
resume before it re-queues a run), so a loss is noticed at the latest by the next publish. With
persistence (AOF) the marker survives and nothing is failed: the queues are back and unacknowledged tasks are
redelivered after the visibility timeout.
"""

from __future__ import annotations

import logging
import threading

import redis

from services.common.settings import Settings
from services.common.store import Store
from services.worker.dispatch import check_broker, end_silent_runs

log = logging.getLogger(__name__)


def watch(settings: Settings, store: Store, stop: threading.Event) -> None:
    """Every `broker_watch_s` until `stop` is set: check the broker (a Redis one), and end
    the runs whose tasks' processes stopped beating (heartbeat.py)."""
    client = None
    if settings.broker_url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2,
                                      socket_timeout=2)
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
        if stop.wait(settings.broker_watch_s):
            return


def start(settings: Settings, store: Store) -> threading.Event:
    """Start the watch in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=watch, args=(settings, store, stop), name="broker-watch",
                     daemon=True).start()
    return stop
