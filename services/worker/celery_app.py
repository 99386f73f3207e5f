"""The Celery application shared by every process that sends or runs pipeline tasks.

Queues: `train` (the trainer, concurrency 1 per GPU), `fit` (influence-model fits
and the select chord callback) and `score` (pool shards). Tasks acknowledge late,
so a worker that dies mid-task has its task redelivered; every task is idempotent.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import redis
from celery import Celery
from celery.signals import worker_process_init, worker_ready
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

from services.common.settings import Settings, get_settings

log = logging.getLogger(__name__)

TRAIN, FIT, SCORE = "train", "fit", "score"
TASK_QUEUES = {
    "mates.train_stage": TRAIN,
    "mates.fit_influence_model": FIT,
    "mates.score_shard": SCORE,
    "mates.select": FIT,
}


class ClosingSafeQoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that a channel whose connection is already gone does not
    kill the worker's consumer.

    When Redis dies under a worker holding tasks, the consumer closes its connection. kombu
    (5.7) then reaches for that connection's client, which is None by then, in two places:
    putting the held tasks back to their queues as the channel closes, and acknowledging a
    task that finishes afterwards (`task_acks_late`). Both raise `AttributeError: 'NoneType'
    object has no attribute 'hostname'` (or `'client'`) inside `_connparams`. Celery takes that
    for an unrecoverable error, and the worker stays alive but consumes nothing (seen in
    tests/services/test_faults.py, Redis killed mid-scoring: the run stayed `running`).
    Nothing is lost by letting both go: kombu wrote each delivered task to the broker's
    unacked hash, and the visibility-timeout sweep redelivers it from there (every task is
    idempotent, so a finished one that could not be acknowledged just runs again).
    """

    def restore_unacked(self, client=None):
        try:
            return super().restore_unacked(client)
        except (AttributeError, OSError, redis.RedisError) as e:
            log.warning("could not put %d unacknowledged task(s) back as the broker connection "
                        "closed (%s: %s); the broker redelivers them after the visibility timeout",
                        len(self._delivered), type(e).__name__, e)
            self._delivered.clear()  # as a successful restore leaves it
            return None

    def ack(self, delivery_tag):
        return self._settle("acknowledge", delivery_tag, super().ack, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        return self._settle("reject", delivery_tag, super().reject, delivery_tag, requeue=requeue)

    def _settle(self, what: str, delivery_tag, settle, *args, **kwargs):
        """Ack or reject; on a closed connection (see the class) forget the task here and
        leave it to the broker, which keeps it in its unacked hash."""
        try:
            return settle(*args, **kwargs)
        except AttributeError as e:
            log.warning("could not %s task %s on a closed broker connection (%s); the broker "
                        "redelivers it after the visibility timeout", what, delivery_tag, e)
            kombu_virtual.QoS.ack(self, delivery_tag)
            return None


kombu_redis.Channel.QoS = ClosingSafeQoS


def transport_options(settings: Settings) -> dict:
    """Redis transport: unacknowledged tasks (their worker died) go back to the queue once
    `visibility_timeout_s` has passed, found by a sweep every few seconds (kombu's default
    sweeps only every ~100 s, far too rarely for a short timeout)."""
    vt = settings.visibility_timeout_s
    return {"visibility_timeout": vt, "unacked_restore_interval": max(1, min(10, vt // 4)),
            "unacked_restore_throttle": 1}


def make_celery(settings: Settings) -> Celery:
    app = Celery("mates", broker=settings.broker_url, backend=settings.backend_url,
                 include=["services.worker.tasks", "services.trainer.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_routes={name: {"queue": q} for name, q in TASK_QUEUES.items()},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options(settings),
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_expires=7 * 86_400,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_soft_shutdown_timeout=settings.soft_shutdown_s,
        worker_enable_soft_shutdown_on_idle=True,
    )
    return app


app = make_celery(get_settings())  # what `celery -A services.worker.celery_app` and the workers run


@lru_cache(maxsize=8)
def _app_for(broker_url: str, backend_url: str, visibility_timeout_s: int) -> Celery:
    s = get_settings()
    if (broker_url, backend_url, visibility_timeout_s) == (s.broker_url, s.backend_url, s.visibility_timeout_s):
        return app
    return make_celery(Settings(broker_url=broker_url, result_backend=backend_url,
                                visibility_timeout_s=visibility_timeout_s))


def app_for(settings: Settings) -> Celery:
    """The Celery app that sends to `settings`' broker (the API may be given its own settings)."""
    return _app_for(settings.broker_url, settings.backend_url, settings.visibility_timeout_s)


@worker_process_init.connect
def _limit_threads(**_) -> None:
    _apply_threads(get_settings())


@worker_ready.connect
def _watch_broker(**_) -> None:
    from services.worker.tasks import get_store
    from services.worker.watch import start

    start(get_settings(), get_store())  # checks a Redis broker; heartbeats with any broker


def _apply_threads(settings: Settings) -> None:
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)


def _worker(queues: list[str], pool: str, concurrency: int, kind: str) -> None:
    settings = get_settings()
    name = settings.node_name or f"{kind}-{os.getpid()}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _apply_threads(settings)
    log.info("worker %s: queues %s, pool %s x%d, broker %s", name, queues, pool, concurrency,
             settings.broker_url)
    app.worker_main(["worker", "-Q", ",".join(queues), "--pool", pool, "-c", str(concurrency),
                     "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"])


def serve() -> None:
    """`mates serve worker`: the fit and score queues."""
    s = get_settings()
    _worker([FIT, SCORE], s.worker_pool, s.worker_concurrency, "worker")
