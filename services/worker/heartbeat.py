"""Heartbeats of running tasks: how a run whose process was killed is told from a slow one.

A task whose process is SIGKILLed (OOM killer, a lost machine) is redelivered only after
the broker's visibility timeout (a day by default), and until then its run stays active
with nothing working on it. So while a stage task runs, a daemon thread of its process
refreshes the task's row in the run store every `heartbeat_s`, and the row is deleted
when the task ends, whichever way. A row that stopped beating `heartbeat_timeout_s` ago
belongs to a dead process: `dispatch.end_silent_runs` (called by the broker watch of
every worker and trainer, and by cancel and resume) ends its run, resumable.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from services.common.store import Store

log = logging.getLogger(__name__)


class Heartbeat:
    """`with Heartbeat(...):` beats for one task while the block runs. Store errors are
    logged and retried at the next beat: the heartbeat never fails the task."""

    def __init__(self, store: Store, every_s: float, task_id: str, run_id: str, generation: int,
                 task: str, stage: int, shard: int = -1):
        self.store, self.every_s, self.task_id = store, every_s, task_id
        self.row = {"run_id": run_id, "generation": generation, "task": task, "stage": stage,
                    "shard": shard, "worker": f"{socket.gethostname()}:{os.getpid()}"}
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
            log.warning("heartbeat of task %s: could not delete its row", self.task_id,
                        exc_info=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._beat()

    def _beat(self) -> None:
        try:
            self.store.beat(self.task_id, **self.row)
        except Exception:  # a busy or briefly absent store: the next beat tries again
            log.warning("heartbeat of task %s (run %s): store write failed", self.task_id,
                        self.row["run_id"], exc_info=True)
