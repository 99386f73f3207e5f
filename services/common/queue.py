"""The task queue: the Celery app factory, routing, and enqueue-once.

Queues and task names are the wire contract (`contracts.TASK_QUEUES`). Tasks acknowledge
late, so a worker that dies mid-task has its task redelivered; every task is idempotent.
Nothing is read at import: `make_celery(settings)` builds an app, `default_app()` the one
of this process's settings (what `celery -A services.common.queue` finds as `app`).

A run's tasks carry its *generation*; resuming bumps it, so a task left over from before a
cancel or failure finds itself stale and does nothing. Every enqueue is claimed in the run
store first (run, generation, task, stage), so a re-delivered task never enqueues its
downstream work twice.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

from services.common.contracts import TASK_QUEUES
from services.common.errors import BrokerUnavailable, PublishPending
from services.common.settings import Settings, get_settings
from services.common.store import Store, default_store
from services.common.watchdog import check_broker_of, start_watch

log = logging.getLogger(__name__)

TASK_MODULES = ["services.worker.tasks", "services.trainer.tasks"]


# Publishing fails fast when the broker is down: a caller (an HTTP request, a task) must
# not hang; a run left without its next task is marked failed, so it can be resumed.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


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
            log.warning(
                "could not put %d unacknowledged task(s) back as the broker connection "
                "closed (%s: %s); the broker redelivers them after the visibility timeout",
                len(self._delivered),
                type(e).__name__,
                e,
            )
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
            log.warning(
                "could not %s task %s on a closed broker connection (%s); the broker "
                "redelivers it after the visibility timeout",
                what,
                delivery_tag,
                e,
            )
            kombu_virtual.QoS.ack(self, delivery_tag)
            return None


kombu_redis.Channel.QoS = ClosingSafeQoS  # every Redis channel of this process


def transport_options(settings: Settings) -> dict:
    """Redis transport: unacknowledged tasks (their worker died) go back to the queue once
    `visibility_timeout_s` has passed, found by a sweep every few seconds (kombu's default
    sweeps only every ~100 s, far too rarely for a short timeout)."""
    vt = settings.visibility_timeout_s
    return {
        "visibility_timeout": vt,
        "unacked_restore_interval": max(1, min(10, vt // 4)),
        "unacked_restore_throttle": 1,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery(
        "mates", broker=settings.broker_url, backend=settings.backend_url, include=TASK_MODULES
    )
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


@functools.lru_cache(maxsize=8)
def _app_for(broker_url: str, backend_url: str, visibility_timeout_s: int) -> Celery:
    s = get_settings()
    if (broker_url, backend_url, visibility_timeout_s) == (
        s.broker_url,
        s.backend_url,
        s.visibility_timeout_s,
    ):
        return default_app()
    return make_celery(
        Settings(
            broker_url=broker_url,
            result_backend=backend_url,
            visibility_timeout_s=visibility_timeout_s,
        )
    )


@functools.cache
def default_app() -> Celery:
    """The app of this process's settings: what the workers run and the tasks bind to."""
    return make_celery(get_settings())


def app_for(settings: Settings) -> Celery:
    """The Celery app that sends to `settings`' broker (the API may be given its own settings)."""
    return _app_for(settings.broker_url, settings.backend_url, settings.visibility_timeout_s)


def __getattr__(name: str):
    if name == "app":  # `celery -A services.common.queue ...` (the compose healthchecks)
        return default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- enqueue once


def claim(store: Store, run_id: str, generation: int, task: str, stage: int) -> bool:
    """True: publish `task` now. False: it was published already. PublishPending: another
    process claimed it and has not confirmed yet (retry later: a dead claimer's claim goes
    stale and is taken over)."""
    if store.claim_dispatch(run_id, generation, task, stage):
        return True
    if store.dispatch_sent(run_id, generation, task, stage):
        log.info(
            "%s %s stage %d (generation %d) was already enqueued", task, run_id, stage, generation
        )
        return False
    raise PublishPending(f"{task} of run {run_id} stage {stage} is claimed but not yet sent")


def enqueue(
    settings: Settings,
    store: Store,
    run_id: str,
    task: str,
    stage: int,
    generation: int,
    *args: int,
    claim_as: str | None = None,
) -> bool:
    """Send `mates.<task>` once per (run, generation, task, stage); False if already sent.
    `claim_as` claims it under another name (a task published again, once, by the watch).

    Raises BrokerUnavailable when publishing fails, PublishPending as `claim` does.
    """
    check_broker_of(settings, store)  # a loss is claimed before anything goes into the new broker
    task_claim = claim_as or task
    if not claim(store, run_id, generation, task_claim, stage):
        return False
    try:
        app_for(settings).send_task(
            f"mates.{task}",
            args=(run_id, stage, *args, generation),
            retry=True,
            retry_policy=PUBLISH_RETRY,
            ignore_result=True,
        )
    except Exception as e:  # kombu/redis raise many types for "broker unreachable"
        raise BrokerUnavailable(
            f"could not enqueue {task} of run {run_id} stage {stage}: {type(e).__name__}: {e}"
        ) from e
    store.mark_sent(run_id, generation, task_claim, stage)
    return True


# --------------------------------------------------------------------------- workers


def _limit_threads(settings: Settings) -> None:
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)


def run_worker(
    queues: list[str],
    pool: str,
    concurrency: int,
    kind: str,
    watch_also: tuple[Callable[[Settings, Store], object], ...] = (),
) -> None:
    """Consume `queues` in this process until it is stopped: `mates serve worker|trainer`.
    Every pool process limits its torch threads; the worker watches the broker and the
    heartbeats (the watchdog), and runs `watch_also` with them, once it is ready."""
    from celery.signals import worker_process_init, worker_ready

    settings = get_settings()
    name = settings.node_name or f"{kind}-{os.getpid()}"
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _limit_threads(settings)
    worker_process_init.connect(lambda **_: _limit_threads(get_settings()), weak=False)
    worker_ready.connect(
        lambda **_: start_watch(get_settings(), default_store(), watch_also), weak=False
    )
    log.info(
        "worker %s: queues %s, pool %s x%d, broker %s",
        name,
        queues,
        pool,
        concurrency,
        settings.broker_url,
    )
    default_app().worker_main(
        [
            "worker",
            "-Q",
            ",".join(queues),
            "--pool",
            pool,
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )


# kombu's Redis transport keeps a queue's messages of priority p > 0 in "<queue>\x06\x16<p>"
_PRIORITY_KEYS = ("", *(f"{kombu_redis.Channel.sep}{p}" for p in kombu_redis.PRIORITY_STEPS if p))


def queue_depths(broker_url: str) -> dict[str, int]:
    """Messages waiting in each of the task queues (not those a worker holds)."""
    client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return {
            queue: sum(int(client.llen(queue + suffix)) for suffix in _PRIORITY_KEYS)
            for queue in sorted(set(TASK_QUEUES.values()))
        }
    finally:
        client.close()
