"""Pipeline tasks. Each takes IDs, is idempotent, and never waits on another task.

`fit_influence_model(run_id, stage, generation)` (queue `fit`) fits and registers
the model, then fans `score_shard(run_id, stage, shard, generation)` out over the
`score` queue as a chord whose callback `select(run_id, stage, generation)` writes
stage k+1's selection manifest and enqueues its training. The work itself is the
library's stage functions; a task only opens the run, checks that it is still
wanted, calls them and hands on.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import httpx
from celery import Task, chord
from sqlalchemy.exc import OperationalError

from mates.artifacts import RunPaths, append_jsonl, read_json
from mates.errors import ArtifactError
from mates.manifest import Manifest
from mates.run import Cancelled, Run
from services.common.settings import Settings, get_settings
from services.common.store import Store
from services.worker.celery_app import app
from services.worker.dispatch import BrokerUnavailable, PublishPending, claim, enqueue
from services.worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)


class TransientError(Exception):
    """A failure worth retrying: the scorer, broker or database was briefly unavailable."""


class ScorerUnavailable(TransientError):
    """The scorer did not answer, or answered 5xx/429: the shard waits and retries."""


try:  # redis-py's connection errors, when the broker/backend hiccups
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # pragma: no cover - redis is a services dependency
    RedisConnectionError = RedisTimeoutError = TransientError  # type: ignore[misc,assignment]

TRANSIENT: tuple[type[BaseException], ...] = (
    TransientError, httpx.TransportError, OperationalError, RedisConnectionError, RedisTimeoutError,
    ConnectionError, TimeoutError, BrokerUnavailable, PublishPending)


@lru_cache(maxsize=1)
def get_store() -> Store:
    return Store(get_settings().database_url)


class StageTask(Task):
    """Late acknowledgement, bounded retries with exponential backoff on transient errors;
    a task that finally fails marks its stage and run failed, and so does a task delivered
    more than `task_max_deliveries` times (each delivery killed its worker)."""

    acks_late = True
    autoretry_for = TRANSIENT
    retry_backoff = get_settings().task_retry_backoff_s
    retry_backoff_max = get_settings().task_retry_backoff_max_s
    retry_jitter = get_settings().task_retry_jitter
    max_retries = get_settings().task_max_retries

    def __call__(self, *args, **kwargs):
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        if self.poisoned(*args):
            return "poisoned"
        with self.heartbeat(*args):
            return super().__call__(*args, **kwargs)

    def heartbeat(self, run_id: str, stage: int, *rest: int) -> Heartbeat:
        """Beat in the run store while this delivery runs, so that its death is noticed."""
        generation, shard = rest[-1], (rest[0] if len(rest) == 2 else -1)
        return Heartbeat(get_store(), get_settings().heartbeat_s, self.request.id, run_id,
                         generation, self.name, stage, shard)

    def poisoned(self, run_id: str, stage: int, *rest: int) -> bool:
        """Count this delivery; past the limit, fail the run instead of running the task."""
        generation, shard = rest[-1], (rest[0] if len(rest) == 2 else -1)
        store = get_store()
        try:
            n = store.count_delivery(run_id, generation, self.name, stage, shard,
                                     self.request.retries)
        except TRANSIENT:  # the store is briefly down: run the task, it retries on its own
            return False
        limit = get_settings().task_max_deliveries
        if n <= limit:
            return False
        what = f"{self.name} of stage {stage}" + (f" shard {shard}" if shard >= 0 else "")
        reason = (f"{what} was delivered {n} times (MATES_TASK_MAX_DELIVERIES = {limit}) and "
                  "never finished: each delivery lost its worker (killed, e.g. out of memory)")
        log.error("run %s: %s; failing the run instead of redelivering it", run_id, reason)
        record_failure(store, run_id, stage, generation, reason)
        return True

    def on_failure(self, exc, task_id, args, kwargs, einfo):  # noqa: D401 - Celery hook
        run_id, stage, generation = args[0], args[1], args[-1]
        retried = self.request.retries
        after = f" (after {retried} retries)" if retried else ""
        try:
            record_failure(get_store(), run_id, stage, generation,
                           f"{self.name}: {type(exc).__name__}: {exc}{after}")
        except Exception:  # the original error is what Celery reports; do not mask it
            log.exception("could not record the failure of %s for run %s", self.name, run_id)


def record_failure(store: Store, run_id: str, stage: int, generation: int, reason: str) -> None:
    """Mark the run failed unless it moved on; works even where the run cannot be opened
    (e.g. its config asks for a device this worker lacks)."""
    row = store.get_run(run_id)
    if row is None or row["generation"] != generation:
        return
    try:
        manifest = Manifest.load(RunPaths(Path(row["artifacts_dir"])).manifest)
    except Exception as e:  # run.json itself is unreadable: the store still records it
        store.set_status(run_id, "failed", f"{reason}; run.json unreadable: {e}")
        return
    if manifest.data["status"] in ("failed", "cancelled", "done"):
        return
    manifest.on_save = store.sync_manifest
    stage = min(max(stage, 0), len(manifest.data["stages"]) - 1)
    if manifest.stage(stage)["state"] != "done":
        manifest.transition(stage, "failed", reason)
    manifest.set_status("failed", f"stage {stage} failed: {reason}")


def open_run(store: Store, run_id: str, generation: int) -> Run:
    """The run's library object, mirroring every manifest change into the run store; its
    manifest refuses to write once the run has moved to a newer generation."""
    row = store.get_run(run_id)
    if row is None:
        raise ArtifactError(f"run {run_id} is not in the run store")
    run = Run.open(Path(row["artifacts_dir"]), progress=False)
    run.manifest.on_save = store.sync_manifest
    run.manifest.still_current = lambda: store.get_generation(run_id) == generation
    return run


@contextmanager
def wanted(run_id: str, stage: int, generation: int):
    """Yield the run if this task should still work on it, else None.

    A task from an older generation (the run was resumed since) is stale; a run with a
    cancel request is marked cancelled here, so a queued task ends it cleanly.
    """
    store = get_store()
    current = store.get_generation(run_id)
    if current != generation:
        log.info("run %s stage %d: generation %d is stale (now %d); skipping", run_id, stage,
                 generation, current)
        yield None
        return
    run = open_run(store, run_id, generation)
    if run.manifest.data["status"] == "failed":  # e.g. by a poisoned task; a resume bumps it
        log.info("run %s stage %d: the run failed meanwhile; skipping", run_id, stage)
        yield None
        return
    if run.paths.cancel.exists():
        if run.manifest.data["status"] != "cancelled":
            run.mark_cancelled(stage)
        yield None
        return
    try:
        yield run
    except Cancelled:
        log.info("run %s stage %d cancelled", run_id, stage)


def stage_done(run: Run, stage: int) -> bool:
    return run.manifest.stage(stage)["state"] == "done"


# --------------------------------------------------------------------------- fit


@app.task(name="mates.fit_influence_model", base=StageTask, bind=True)
def fit_influence_model(self, run_id: str, stage: int, generation: int) -> str:
    with wanted(run_id, stage, generation) as run:
        if run is None:
            return "skipped"
        if stage_done(run, stage):
            return "done already"
        with run.guard(stage, transient=TRANSIENT):
            run.prepare()
            path = run.fit_stage(stage)
            fit = read_json(path / "meta.json").get("fit", {})
            get_store().register_model(run_id, stage, str(path.resolve()), fit)
            run.begin_scoring(stage)
            shards = run.num_shards(stage)
        fan_out(get_store(), run_id, stage, shards, generation)
        return f"{shards} shards"
    return "cancelled"


def fan_out(store: Store, run_id: str, stage: int, shards: int, generation: int) -> None:
    """One chord per (run, generation, stage): score every shard, then `select`.

    `select` is also the chord's error callback: a shard whose result could not be stored
    (the broker blinked) makes the chord fail although its scores are on disk; `select`
    scores whatever is missing itself."""
    if not claim(store, run_id, generation, "score_shard", stage):
        return
    after = select.si(run_id, stage, generation)
    after.link_error(select.si(run_id, stage, generation))
    try:
        chord(score_shard.s(run_id, stage, s, generation) for s in range(shards))(after)
    except Exception as e:  # the broker or the result backend refused the chord
        raise BrokerUnavailable(f"could not enqueue the shards of run {run_id} stage {stage}: "
                                f"{type(e).__name__}: {e}") from e
    store.mark_sent(run_id, generation, "score_shard", stage)


# --------------------------------------------------------------------------- score


def http_scorer(settings: Settings, version: str):
    """`score_texts(ids, texts)` calling the scorer service in request-sized chunks."""

    def score_texts(ids: list[str], texts: list[str]) -> list[float]:
        # The model reads only its first `max_tokens` tokens; cutting what is sent to the
        # scorer's character limit changes no score, and a huge document fails nothing.
        texts = [t[: settings.scorer_max_chars] for t in texts]
        per = min(settings.scorer_max_documents, 256)
        out: list[float] = []
        headers = {"Authorization": f"Bearer {settings.api_key}"}
        with httpx.Client(base_url=settings.scorer_url, timeout=settings.http_timeout_s,
                          headers=headers) as client:
            for i in range(0, len(ids), per):
                docs = [{"id": d, "text": t} for d, t in zip(ids[i:i + per], texts[i:i + per], strict=True)]
                try:
                    r = client.post("/v1/score", json={"model": version, "documents": docs})
                except httpx.TransportError as e:
                    raise ScorerUnavailable(f"scorer at {settings.scorer_url} unreachable: "
                                            f"{type(e).__name__}: {e}") from e
                if r.status_code >= 500 or r.status_code == 429:
                    raise ScorerUnavailable(f"scorer answered {r.status_code}: {r.text[:200]}")
                if r.status_code != 200:
                    raise ArtifactError(f"scorer refused the shard ({r.status_code}): {r.text[:300]}")
                got = {row["id"]: row["score"] for row in r.json()}
                out.extend(float(got[d["id"]]) for d in docs)
        return out

    return score_texts


@app.task(name="mates.score_shard", base=StageTask, bind=True)
def score_shard(self, run_id: str, stage: int, shard: int, generation: int) -> str:
    with wanted(run_id, stage, generation) as run:
        if run is None:
            return "skipped"
        if stage_done(run, stage) or run.paths.score_shard(stage, shard).is_file():
            return "done already"
        settings = get_settings()
        fn = http_scorer(settings, f"{run_id}/{stage}") if settings.score_mode == "http" else None
        with run.guard(stage, transient=TRANSIENT):
            run.prepare()
            try:
                run.score_shard(stage, shard, fn)
            except ScorerUnavailable as e:
                note_scorer_wait(run, stage, shard, self.request.retries, self.max_retries, e)
                raise
            note_scorer_back(run, stage)
        return "scored"
    return "cancelled"


def note_scorer_wait(run: Run, stage: int, shard: int, retries: int, max_retries: int | None,
                     error: Exception) -> None:
    """Show that the stage waits for the scorer: its metrics `scorer_wait` (what the API
    returns) and an event in events.jsonl. Best effort: the retry matters, not the note."""
    last = max_retries is not None and retries >= max_retries
    wait = {"state": "gave up" if last else "waiting", "shard": shard, "retries": retries,
            "max_retries": max_retries, "error": str(error)[:300], "at": time.time()}
    try:
        append_jsonl(run.paths.events, {"at": wait["at"], "stage": stage,
                                        "event": "waiting for scorer", **wait})
        run.manifest.update_metrics(stage, scorer_wait=wait)
    except Exception:
        log.warning("run %s stage %d: could not record the scorer wait", run.manifest.run_id,
                    stage, exc_info=True)


def note_scorer_back(run: Run, stage: int) -> None:
    wait = run.manifest.stage(stage)["metrics"].get("scorer_wait")
    if wait and wait.get("state") == "waiting":
        run.manifest.update_metrics(stage, scorer_wait={**wait, "state": "recovered",
                                                        "at": time.time()})
        append_jsonl(run.paths.events, {"at": time.time(), "stage": stage,
                                        "event": "scorer back"})


# --------------------------------------------------------------------------- select


def score_missing_shards(run: Run, stage: int) -> None:
    """Score here any shard without its file. The chord calls `select` once it has counted
    every shard's result; a shard counted twice (redelivered after it had stored its
    result) can make it call early, and a lost shard task must not lose the stage."""
    settings = get_settings()
    fn = http_scorer(settings, f"{run.manifest.run_id}/{stage}") if settings.score_mode == "http" else None
    for shard in range(run.num_shards(stage)):
        if not run.paths.score_shard(stage, shard).is_file():
            log.warning("run %s stage %d: shard %d has no scores yet; scoring it in select",
                        run.manifest.run_id, stage, shard)
            run.score_shard(stage, shard, fn)


@app.task(name="mates.select", base=StageTask, bind=True)
def select(self, run_id: str, stage: int, generation: int) -> str:
    with wanted(run_id, stage, generation) as run:
        if run is None:
            return "skipped"
        with run.guard(stage, transient=TRANSIENT):
            if not stage_done(run, stage):
                run.prepare()
                score_missing_shards(run, stage)
                run.select_stage(stage)
        enqueue(get_settings(), get_store(), run_id, "train_stage", stage + 1, generation)
        return "selected"
    return "cancelled"
