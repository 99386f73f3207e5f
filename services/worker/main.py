"""`mates serve worker`: a Celery worker on the `fit` and `score` queues."""

from __future__ import annotations

from services.common.contracts import FIT, SCORE
from services.common.lifecycle import rescue_stalled_runs
from services.common.queue import run_worker
from services.common.settings import get_settings


def serve() -> None:
    s = get_settings()
    run_worker(
        [FIT, SCORE],
        s.worker_pool,
        s.worker_concurrency,
        "worker",
        watch_also=(rescue_stalled_runs,),
    )
