"""The run store: runs, stage states, transitions, model versions, task dispatches,
deliveries and the heartbeats of running tasks.

SQLite by default, PostgreSQL by URL. Several processes (the API, workers, the
trainer) share it, so every write that reads what it then changes takes the run's
row lock first (an UPDATE before the reads), and uniqueness is left to primary
keys: a second `claim_dispatch` or `register_model` of the same key loses cleanly.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.pool import StaticPool

from mates.errors import RunStateError
from services.common.contracts import CANCELLING, FINAL, STATUSES
from services.common.settings import get_settings

metadata = MetaData()

runs = Table(
    "runs", metadata,
    Column("id", String(128), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("error", Text),
    Column("current_stage", Integer, nullable=False, default=0),
    Column("num_stages", Integer, nullable=False),
    Column("generation", Integer, nullable=False, default=0),
    Column("config", JSON, nullable=False),
    Column("artifacts_dir", String(1024), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_runs_status_created", "status", "created_at"),
)

stages = Table(
    "stages", metadata,
    Column("run_id", String(128), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("stage", Integer, primary_key=True),
    Column("state", String(32), nullable=False),
    Column("error", Text),
    Column("timings", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)

transitions = Table(
    "transitions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("stage", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("at", Float, nullable=False),
    Column("reason", Text),
    Index("ix_transitions_run_stage", "run_id", "stage"),
)

model_versions = Table(
    "model_versions", metadata,
    Column("version", String(160), primary_key=True),
    Column("run_id", String(128), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("stage", Integer, nullable=False),
    Column("path", String(1024), nullable=False),
    Column("val_spearman", Float),
    Column("val_pearson", Float),
    Column("num_probes", Integer),
    Column("fit", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_model_versions_run", "run_id"),
)

dispatches = Table(
    "dispatches", metadata,
    Column("run_id", String(128), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("task", String(64), primary_key=True),
    Column("stage", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("sent_at", Float, nullable=True),  # null: claimed, not yet known to be published
)

# How often each attempt of a task was delivered to a worker: a retry is a new attempt, a
# redelivery (the worker died holding it) is not, so a count above one means lost workers.
deliveries = Table(
    "deliveries", metadata,
    Column("run_id", String(128), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("task", String(64), primary_key=True),
    Column("stage", Integer, primary_key=True),
    Column("shard", Integer, primary_key=True),  # -1: the task has no shard
    Column("attempt", Integer, primary_key=True),  # Celery's retry number
    Column("count", Integer, nullable=False),
    Column("at", Float, nullable=False),
)

# One row per task that is running (or died running): its process refreshes `beat_at` every
# MATES_HEARTBEAT_S and deletes the row when the task ends, so a row whose beat is old belongs
# to a process that died (worker/heartbeat.py). A queued task has no row: waiting is not dying.
heartbeats = Table(
    "heartbeats", metadata,
    Column("task_id", String(64), primary_key=True),  # Celery's ID: a redelivery reuses it
    Column("run_id", String(128), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("task", String(64), nullable=False),
    Column("stage", Integer, nullable=False),
    Column("shard", Integer, nullable=False),  # -1: the task has no shard
    Column("worker", String(256), nullable=False),  # host and PID, for the operator
    Column("started_at", Float, nullable=False),
    Column("beat_at", Float, nullable=False),
    Index("ix_heartbeats_run", "run_id"),
)

# Small facts the services share through the store, e.g. the broker's marker (worker/watch.py).
service_state = Table(
    "service_state", metadata,
    Column("key", String(128), primary_key=True),
    Column("value", Text, nullable=False),
    Column("at", Float, nullable=False),
)


class RunExists(RunStateError):
    """`create_run` was given an ID the store already holds."""


def _now() -> float:
    return round(time.time(), 3)


def normalize_url(url: str) -> URL:
    """Parse a database URL; plain `postgresql://` (or `postgres://`) uses psycopg 3."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str) -> Engine:
    u = normalize_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True, future=True)
    db = u.database
    if not db or db == ":memory:":
        # One shared connection, or each would see its own empty database.
        return create_engine(u, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # several processes write the same file
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def finite_json(obj: Any) -> Any:
    """`obj` with NaN and infinities as None: PostgreSQL's JSON and strict JSON reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _stage_row(run_id: str, st: dict[str, Any], at: float) -> dict[str, Any]:
    return {"run_id": run_id, "stage": int(st["stage"]), "state": st["state"],
            "error": st.get("error"), "timings": finite_json(st.get("timings") or {}),
            "metrics": finite_json(st.get("metrics") or {}), "updated_at": at}


def _transition_rows(run_id: str, st: dict[str, Any], already: int) -> list[dict[str, Any]]:
    rows = []
    items = st.get("transitions") or []
    for i, t in enumerate(items[already:], start=already):
        reason = t.get("reason")
        if reason is None and i == len(items) - 1 and t["state"] in ("failed", "cancelled"):
            reason = st.get("error")  # the stage's error explains its last failure
        rows.append({"run_id": run_id, "stage": int(st["stage"]), "state": t["state"],
                     "at": float(t["at"]), "reason": reason})
    return rows


def num_probes_of(fit: dict[str, Any]) -> int | None:
    """Probes behind a fit: `num_probes` if recorded, else its train + validation sizes."""
    if fit.get("num_probes") is not None:
        return int(fit["num_probes"])
    if fit.get("train_size") is not None and fit.get("val_size") is not None:
        return int(fit["train_size"]) + int(fit["val_size"])
    return None


class Store:
    """The run store behind one SQLAlchemy URL; tables are created on first use."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._create_tables()

    def _create_tables(self, attempts: int = 5) -> None:
        """Create missing tables. The api and the workers start together and all do this:
        one may create a table between another's existence check and its CREATE, which
        fails that CREATE; the next attempt then finds the table."""
        for attempt in range(attempts):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                return
            except (OperationalError, ProgrammingError, IntegrityError):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # ------------------------------------------------------------------ runs

    def create_run(self, manifest: dict[str, Any], artifacts_dir: str) -> None:
        run_id = manifest["run_id"]
        created = float(manifest.get("created_at") or _now())
        row = {
            "id": run_id, "name": manifest["name"], "status": manifest.get("status", "pending"),
            "error": manifest.get("error"), "current_stage": int(manifest.get("current_stage", 0)),
            "num_stages": len(manifest["stages"]), "generation": 0,
            "config": finite_json(manifest.get("config") or {}), "artifacts_dir": str(artifacts_dir),
            "created_at": created, "updated_at": float(manifest.get("updated_at") or created),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(runs).values(**row))
                self._sync_stages(conn, run_id, manifest["stages"], row["updated_at"], existing={})
        except IntegrityError:
            raise RunExists(f"run {run_id} already exists in the run store") from None

    def sync_manifest(self, manifest: dict[str, Any]) -> None:
        """Mirror run.json: run status, stage rows, and the transitions not yet stored."""
        run_id = manifest["run_id"]
        new = manifest["status"]
        at = float(manifest.get("updated_at") or _now())
        # A cancel request outlives progress reports until the run actually ends.
        status = new if new in FINAL else case(
            (runs.c.status == CANCELLING, CANCELLING), else_=new)
        with self.engine.begin() as conn:
            # The UPDATE comes first: it takes the run's row (or SQLite's write) lock, so
            # two processes syncing the same run count and insert transitions in turn.
            done = conn.execute(
                update(runs).where(runs.c.id == run_id).values(
                    status=status, error=manifest.get("error"),
                    current_stage=int(manifest.get("current_stage", 0)),
                    num_stages=len(manifest["stages"]), updated_at=at))
            if done.rowcount == 0:
                raise RunStateError(f"run {run_id} is not in the run store")
            existing = {r.stage: r.n for r in conn.execute(
                select(transitions.c.stage, func.count().label("n"))
                .where(transitions.c.run_id == run_id).group_by(transitions.c.stage))}
            self._sync_stages(conn, run_id, manifest["stages"], at, existing)

    def _sync_stages(self, conn: Connection, run_id: str, items: list[dict[str, Any]], at: float,
                     existing: dict[int, int]) -> None:
        have = set(conn.execute(select(stages.c.stage).where(stages.c.run_id == run_id)).scalars())
        rows = [_stage_row(run_id, st, at) for st in items]
        fresh = [r for r in rows if r["stage"] not in have]
        if fresh:
            conn.execute(insert(stages), fresh)
        for r in rows:
            if r["stage"] in have:
                conn.execute(update(stages).where(and_(stages.c.run_id == run_id,
                                                       stages.c.stage == r["stage"]))
                             .values(state=r["state"], error=r["error"], timings=r["timings"],
                                     metrics=r["metrics"], updated_at=at))
        new_transitions = [t for st in items
                           for t in _transition_rows(run_id, st, existing.get(int(st["stage"]), 0))]
        if new_transitions:
            conn.execute(insert(transitions), new_transitions)

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        with self.engine.begin() as conn:
            done = conn.execute(update(runs).where(runs.c.id == run_id)
                                .values(status=status, error=error, updated_at=_now()))
        if done.rowcount == 0:
            raise RunStateError(f"run {run_id} is not in the run store")

    def set_status_if(self, run_id: str, status: str, allowed: tuple[str, ...],
                      error: str | None = None) -> bool:
        """Set the status only if it is one of `allowed` (atomically); False otherwise."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        with self.engine.begin() as conn:
            done = conn.execute(update(runs).where(and_(runs.c.id == run_id, runs.c.status.in_(allowed)))
                                .values(status=status, error=error, updated_at=_now()))
        return done.rowcount == 1

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
            if row is None:
                return None
            stage_rows = conn.execute(select(stages).where(stages.c.run_id == run_id)
                                      .order_by(stages.c.stage)).mappings().all()
            trans = conn.execute(select(transitions).where(transitions.c.run_id == run_id)
                                 .order_by(transitions.c.stage, transitions.c.id)).mappings().all()
        by_stage: dict[int, list[dict[str, Any]]] = {}
        for t in trans:
            by_stage.setdefault(t["stage"], []).append(
                {"state": t["state"], "at": t["at"], "reason": t["reason"]})
        out = dict(row)
        out["stages"] = [
            {"stage": s["stage"], "state": s["state"], "error": s["error"],
             "timings": s["timings"], "metrics": s["metrics"], "updated_at": s["updated_at"],
             "transitions": by_stage.get(s["stage"], [])}
            for s in stage_rows
        ]
        return out

    def list_runs(self, status: str | None = None, limit: int = 50,
                  offset: int = 0) -> list[dict[str, Any]]:
        """Run summaries, newest first, each with its current stage's state."""
        q = (select(runs.c.id, runs.c.name, runs.c.status, runs.c.error, runs.c.current_stage,
                    runs.c.num_stages, runs.c.generation, runs.c.artifacts_dir, runs.c.created_at,
                    runs.c.updated_at, stages.c.state.label("stage_state"))
             .select_from(runs.outerjoin(stages, and_(stages.c.run_id == runs.c.id,
                                                      stages.c.stage == runs.c.current_stage)))
             .order_by(runs.c.created_at.desc(), runs.c.id.desc())
             .limit(limit).offset(offset))
        if status is not None:
            q = q.where(runs.c.status == status)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def bump_generation(self, run_id: str) -> int:
        with self.engine.begin() as conn:
            done = conn.execute(update(runs).where(runs.c.id == run_id)
                                .values(generation=runs.c.generation + 1))
            if done.rowcount == 0:
                raise RunStateError(f"run {run_id} is not in the run store")
            return int(conn.execute(select(runs.c.generation).where(runs.c.id == run_id)).scalar_one())

    def bump_generation_from(self, run_id: str, generation: int) -> bool:
        """Bump the generation only if it is still `generation` (atomically): of several
        processes ending the same run, exactly one gets True."""
        with self.engine.begin() as conn:
            done = conn.execute(update(runs).where(and_(runs.c.id == run_id,
                                                        runs.c.generation == generation))
                                .values(generation=runs.c.generation + 1))
        return done.rowcount == 1

    def get_generation(self, run_id: str) -> int:
        with self.engine.connect() as conn:
            gen = conn.execute(select(runs.c.generation).where(runs.c.id == run_id)).scalar()
        if gen is None:
            raise RunStateError(f"run {run_id} is not in the run store")
        return int(gen)

    # ------------------------------------------------------------------ dispatches

    def claim_dispatch(self, run_id: str, generation: int, task: str, stage: int,
                       stale_after: float = 30.0) -> bool:
        """Claim the enqueue of `task` for (run, generation, stage); True: publish it.

        Exactly one concurrent caller wins. A claim whose publishing was never confirmed
        (`mark_sent`) within `stale_after` seconds can be taken over: its claimer most likely
        died between claiming and sending, and sending twice is safe (tasks are idempotent)
        where losing the task would strand the run.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(dispatches).values(run_id=run_id, generation=generation,
                                                       task=task, stage=stage, at=_now()))
            return True
        except IntegrityError:
            pass
        now = _now()
        with self.engine.begin() as conn:
            taken = conn.execute(update(dispatches).where(and_(
                self._dispatch_key(run_id, generation, task, stage),
                dispatches.c.sent_at.is_(None), dispatches.c.at < now - stale_after)).values(at=now))
        return taken.rowcount == 1

    def dispatch_sent(self, run_id: str, generation: int, task: str, stage: int) -> bool:
        with self.engine.connect() as conn:
            sent = conn.execute(select(dispatches.c.sent_at).where(
                self._dispatch_key(run_id, generation, task, stage))).scalar()
        return sent is not None

    @staticmethod
    def _dispatch_key(run_id: str, generation: int, task: str, stage: int):
        return and_(dispatches.c.run_id == run_id, dispatches.c.generation == generation,
                    dispatches.c.task == task, dispatches.c.stage == stage)

    def mark_sent(self, run_id: str, generation: int, task: str, stage: int) -> None:
        """Confirm that a claimed task was published."""
        with self.engine.begin() as conn:
            conn.execute(update(dispatches).where(self._dispatch_key(run_id, generation, task, stage))
                         .values(sent_at=_now()))

    def last_dispatch_at(self, run_id: str, generation: int) -> float | None:
        """When the run's latest task in `generation` was claimed for publishing (None: none
        yet). A claim precedes its publish: a task claimed after a moment went out after it."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(dispatches.c.at)).where(and_(
                dispatches.c.run_id == run_id, dispatches.c.generation == generation))).scalar()

    # ------------------------------------------------------------------ deliveries

    def count_delivery(self, run_id: str, generation: int, task: str, stage: int, shard: int,
                       attempt: int) -> int:
        """Count one more delivery of this attempt of a task; returns the count so far."""
        key = and_(deliveries.c.run_id == run_id, deliveries.c.generation == generation,
                   deliveries.c.task == task, deliveries.c.stage == stage,
                   deliveries.c.shard == shard, deliveries.c.attempt == attempt)
        for _ in range(2):  # a concurrent first insert makes the second round an update
            try:
                with self.engine.begin() as conn:
                    bumped = conn.execute(update(deliveries).where(key).values(
                        count=deliveries.c.count + 1, at=_now()))
                    if bumped.rowcount == 0:
                        conn.execute(insert(deliveries).values(
                            run_id=run_id, generation=generation, task=task, stage=stage,
                            shard=shard, attempt=attempt, count=1, at=_now()))
                    return int(conn.execute(select(deliveries.c.count).where(key)).scalar_one())
            except IntegrityError:
                continue
        raise RunStateError(f"could not count a delivery of {task} for run {run_id}")

    def list_deliveries(self, run_id: str) -> list[dict[str, Any]]:
        """Delivery counts of the run's tasks, oldest first."""
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                select(deliveries).where(deliveries.c.run_id == run_id)
                .order_by(deliveries.c.at)).mappings()]

    # ------------------------------------------------------------------ heartbeats

    def beat(self, task_id: str, run_id: str, generation: int, task: str, stage: int,
             shard: int = -1, worker: str = "") -> None:
        """Record that `task_id` is alive now (its first beat inserts its row)."""
        now = _now()
        for _ in range(2):  # a concurrent first insert makes the second round an update
            try:
                with self.engine.begin() as conn:
                    done = conn.execute(update(heartbeats).where(heartbeats.c.task_id == task_id)
                                        .values(run_id=run_id, generation=generation, beat_at=now))
                    if done.rowcount == 0:
                        conn.execute(insert(heartbeats).values(
                            task_id=task_id, run_id=run_id, generation=generation, task=task,
                            stage=stage, shard=shard, worker=worker, started_at=now, beat_at=now))
                return
            except IntegrityError:
                continue

    def end_beat(self, task_id: str) -> None:
        """The task ended (whichever way): it no longer counts as running."""
        with self.engine.begin() as conn:
            conn.execute(heartbeats.delete().where(heartbeats.c.task_id == task_id))

    def list_heartbeats(self, run_id: str) -> list[dict[str, Any]]:
        """The run's running (or dead) tasks, any generation, oldest beat first."""
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                select(heartbeats).where(heartbeats.c.run_id == run_id)
                .order_by(heartbeats.c.beat_at)).mappings()]

    def silent_runs(self, older_than: float, run_id: str | None = None) -> list[dict[str, Any]]:
        """Active runs (running or cancelling) with tasks of their current generation started,
        none of which has beaten since `older_than`: every process working on them died.

        Each: `run_id`, `status`, `generation`, `beat_at` (the newest beat) and the task,
        stage and shard of that newest beat."""
        live = (select(heartbeats.c.run_id, func.max(heartbeats.c.beat_at).label("beat_at"))
                .select_from(heartbeats.join(runs, and_(
                    runs.c.id == heartbeats.c.run_id,
                    runs.c.generation == heartbeats.c.generation)))
                .where(runs.c.status.in_(("running", CANCELLING)))
                .group_by(heartbeats.c.run_id)
                .having(func.max(heartbeats.c.beat_at) < older_than))
        if run_id is not None:
            live = live.where(heartbeats.c.run_id == run_id)
        newest = live.subquery()
        q = (select(runs.c.id.label("run_id"), runs.c.status, runs.c.generation,
                    newest.c.beat_at, heartbeats.c.task, heartbeats.c.stage, heartbeats.c.shard,
                    heartbeats.c.worker)
             .select_from(newest.join(runs, runs.c.id == newest.c.run_id)
                          .join(heartbeats, and_(heartbeats.c.run_id == runs.c.id,
                                                 heartbeats.c.generation == runs.c.generation,
                                                 heartbeats.c.beat_at == newest.c.beat_at)))
             .order_by(runs.c.id))
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(q).mappings():
                out.setdefault(r["run_id"], dict(r))  # two tasks beat at the same instant
        return list(out.values())

    def clear_heartbeats(self, run_id: str, below_generation: int) -> None:
        """Forget the rows of the run's older generations (their tasks are dead or stale)."""
        with self.engine.begin() as conn:
            conn.execute(heartbeats.delete().where(and_(
                heartbeats.c.run_id == run_id, heartbeats.c.generation < below_generation)))

    # ------------------------------------------------------------------ service state

    def get_state(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(service_state.c.value)
                                .where(service_state.c.key == key)).scalar()

    def put_state(self, key: str, value: str) -> None:
        for _ in range(2):  # a concurrent first insert makes the second round an update
            try:
                with self.engine.begin() as conn:
                    done = conn.execute(update(service_state).where(service_state.c.key == key)
                                        .values(value=value, at=_now()))
                    if done.rowcount == 0:
                        conn.execute(insert(service_state).values(key=key, value=value, at=_now()))
                return
            except IntegrityError:
                continue

    # ------------------------------------------------------------------ model versions

    def register_model(self, run_id: str, stage: int, path: str, fit: dict[str, Any]) -> bool:
        """Record `<run_id>/<stage>`; False (and no second row) if it is registered already."""
        fit = finite_json(fit)
        row = {"version": f"{run_id}/{stage}", "run_id": run_id, "stage": int(stage),
               "path": str(path), "val_spearman": fit.get("val_spearman"),
               "val_pearson": fit.get("val_pearson"), "num_probes": num_probes_of(fit),
               "fit": fit, "created_at": _now()}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(model_versions).values(**row))
        except IntegrityError:
            self.get_generation(run_id)  # a foreign-key failure: raises for an unknown run
            return False
        return True

    def list_models(self, run_id: str | None = None) -> list[dict[str, Any]]:
        q = select(model_versions).order_by(model_versions.c.created_at.desc(),
                                            model_versions.c.stage.desc())
        if run_id is not None:
            q = q.where(model_versions.c.run_id == run_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]


@functools.lru_cache(maxsize=1)
def default_store() -> Store:
    """The run store of this process's settings (`MATES_DATABASE_URL`), opened once."""
    return Store(get_settings().database_url)
