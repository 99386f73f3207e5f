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

from celery import chord, shared_task

from mates.artifacts import append_jsonl, read_json
from mates.run import Run
from services.common.contracts import Outcome
from services.common.errors import TRANSIENT, BrokerUnavailable, ScorerUnavailable
from services.common.queue import claim, enqueue
from services.common.scorer_client import ScorerClient
from services.common.settings import get_settings
from services.common.stagetask import StageTask, stage_done, wanted
from services.common.store import Store, default_store

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- fit


@shared_task(name="mates.fit_influence_model", base=StageTask, bind=True)
def fit_influence_model(self, run_id: str, stage: int, generation: int) -> str:
    with wanted(run_id, stage, generation) as run:
        if run is None:
            return Outcome.SKIPPED
        if stage_done(run, stage):
            return Outcome.DONE_ALREADY
        with run.guard(stage, transient=TRANSIENT):
            run.prepare()
            path = run.fit_stage(stage)
            fit = read_json(path / "meta.json").get("fit", {})
            default_store().register_model(run_id, stage, str(path.resolve()), fit)
            run.begin_scoring(stage)
            shards = run.num_shards(stage)
        fan_out(self.app, default_store(), run_id, stage, shards, generation)
        log.info("run %s stage %d: %d scoring shards enqueued", run_id, stage, shards)
        return Outcome.FANNED_OUT
    return Outcome.CANCELLED


def fan_out(app, store: Store, run_id: str, stage: int, shards: int, generation: int) -> None:
    """One chord per (run, generation, stage): score every shard, then `select`.

    `select` is also the chord's error callback: a shard whose result could not be stored
    (the broker blinked) makes the chord fail although its scores are on disk; `select`
    scores whatever is missing itself."""
    if not claim(store, run_id, generation, "score_shard", stage):
        return
    after = app.signature("mates.select", args=(run_id, stage, generation), immutable=True)
    after.link_error(
        app.signature("mates.select", args=(run_id, stage, generation), immutable=True)
    )
    shard_tasks = [
        app.signature("mates.score_shard", args=(run_id, stage, s, generation))
        for s in range(shards)
    ]
    try:
        chord(shard_tasks, app=app)(after)
    except Exception as e:  # the broker or the result backend refused the chord
        raise BrokerUnavailable(
            f"could not enqueue the shards of run {run_id} stage {stage}: {type(e).__name__}: {e}"
        ) from e
    store.mark_sent(run_id, generation, "score_shard", stage)


# --------------------------------------------------------------------------- score


def http_scorer(version: str):
    """`score_texts(ids, texts)` through the scorer service, or None to score in-process
    (`MATES_SCORE_MODE`)."""
    settings = get_settings()
    return ScorerClient(settings).score_texts(version) if settings.score_mode == "http" else None


@shared_task(name="mates.score_shard", base=StageTask, bind=True)
def score_shard(self, run_id: str, stage: int, shard: int, generation: int) -> str:
    with wanted(run_id, stage, generation) as run:
        if run is None:
            return Outcome.SKIPPED
        if stage_done(run, stage) or run.paths.score_shard(stage, shard).is_file():
            return Outcome.DONE_ALREADY
        fn = http_scorer(f"{run_id}/{stage}")
        with run.guard(stage, transient=TRANSIENT):
            run.prepare()
            try:
                run.score_shard(stage, shard, fn)
            except ScorerUnavailable as e:
                note_scorer_wait(run, stage, shard, self.request.retries, self.max_retries, e)
                raise
            note_scorer_back(run, stage)
        return Outcome.SCORED
    return Outcome.CANCELLED


def note_scorer_wait(
    run: Run, stage: int, shard: int, retries: int, max_retries: int | None, error: Exception
) -> None:
    """Show that the stage waits for the scorer: its metrics `scorer_wait` (what the API
    returns) and an event in events.jsonl. Best effort: the retry matters, not the note."""
    last = max_retries is not None and retries >= max_retries
    wait = {
        "state": "gave up" if last else "waiting",
        "shard": shard,
        "retries": retries,
        "max_retries": max_retries,
        "error": str(error)[:300],
        "at": time.time(),
    }
    try:
        append_jsonl(
            run.paths.events,
            {"at": wait["at"], "stage": stage, "event": "waiting for scorer", **wait},
        )
        run.manifest.update_metrics(stage, scorer_wait=wait)
    except Exception:
        log.warning(
            "run %s stage %d: could not record the scorer wait",
            run.manifest.run_id,
            stage,
            exc_info=True,
        )


def note_scorer_back(run: Run, stage: int) -> None:
    wait = run.manifest.stage(stage)["metrics"].get("scorer_wait")
    if wait and wait.get("state") == "waiting":
        run.manifest.update_metrics(
            stage, scorer_wait={**wait, "state": "recovered", "at": time.time()}
        )
        append_jsonl(run.paths.events, {"at": time.time(), "stage": stage, "event": "scorer back"})


# --------------------------------------------------------------------------- select


def score_missing_shards(run: Run, stage: int) -> None:
    """Score here any shard without its file. The chord calls `select` once it has counted
    every shard's result; a shard counted twice (redelivered after it had stored its
    result) can make it call early, and a lost shard task must not lose the stage."""
    fn = http_scorer(f"{run.manifest.run_id}/{stage}")
    for shard in range(run.num_shards(stage)):
        if not run.paths.score_shard(stage, shard).is_file():
            log.warning(
                "run %s stage %d: shard %d has no scores yet; scoring it in select",
                run.manifest.run_id,
                stage,
                shard,
            )
            run.score_shard(stage, shard, fn)


@shared_task(name="mates.select", base=StageTask, bind=True)
def select(self, run_id: str, stage: int, generation: int) -> str:
    with wanted(run_id, stage, generation) as run:
        if run is None:
            return Outcome.SKIPPED
        with run.guard(stage, transient=TRANSIENT):
            if not stage_done(run, stage):
                run.prepare()
                score_missing_shards(run, stage)
                run.select_stage(stage)
        enqueue(get_settings(), default_store(), run_id, "train_stage", stage + 1, generation)
        return Outcome.SELECTED
    return Outcome.CANCELLED
