"""What the task queue records: each enqueue claimed once, each delivery counted, and the
heartbeats of running tasks (which tell a dead process from a slow one)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from mates.manifest import RunStatus
from services.common.contracts import CANCELLING
from services.common.store.engine import now, upsert
from services.common.store.schema import deliveries, dispatches, heartbeats, runs


class TaskRecords:
    """Dispatches, deliveries and heartbeats (a part of `Store`)."""

    engine: Engine

    def claim_dispatch(
        self, run_id: str, generation: int, task: str, stage: int, stale_after: float = 30.0
    ) -> bool:
        """Claim the enqueue of `task` for (run, generation, stage); True: publish it.

        Exactly one concurrent caller wins. A claim whose publishing was never confirmed
        (`mark_sent`) within `stale_after` seconds can be taken over: its claimer most likely
        died between claiming and sending, and sending twice is safe (tasks are idempotent)
        where losing the task would strand the run.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(dispatches).values(
                        run_id=run_id, generation=generation, task=task, stage=stage, at=now()
                    )
                )
            return True
        except IntegrityError:
            pass
        at = now()
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(dispatches)
                .where(
                    and_(
                        self._dispatch_key(run_id, generation, task, stage),
                        dispatches.c.sent_at.is_(None),
                        dispatches.c.at < at - stale_after,
                    )
                )
                .values(at=at)
            )
        return taken.rowcount == 1

    def dispatch_sent(self, run_id: str, generation: int, task: str, stage: int) -> bool:
        with self.engine.connect() as conn:
            sent = conn.execute(
                select(dispatches.c.sent_at).where(
                    self._dispatch_key(run_id, generation, task, stage)
                )
            ).scalar()
        return sent is not None

    @staticmethod
    def _dispatch_key(run_id: str, generation: int, task: str, stage: int):
        return and_(
            dispatches.c.run_id == run_id,
            dispatches.c.generation == generation,
            dispatches.c.task == task,
            dispatches.c.stage == stage,
        )

    def mark_sent(self, run_id: str, generation: int, task: str, stage: int) -> None:
        """Confirm that a claimed task was published."""
        with self.engine.begin() as conn:
            conn.execute(
                update(dispatches)
                .where(self._dispatch_key(run_id, generation, task, stage))
                .values(sent_at=now())
            )

    def last_dispatch_at(self, run_id: str, generation: int) -> float | None:
        """When the run's latest task in `generation` was claimed for publishing (None: none
        yet). A claim precedes its publish: a task claimed after a moment went out after it."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.max(dispatches.c.at)).where(
                    and_(dispatches.c.run_id == run_id, dispatches.c.generation == generation)
                )
            ).scalar()

    def last_dispatch(self, run_id: str, generation: int) -> dict[str, Any] | None:
        """The run's latest claimed task in `generation` (task, stage, at, sent_at), or None."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(dispatches)
                    .where(
                        and_(dispatches.c.run_id == run_id, dispatches.c.generation == generation)
                    )
                    .order_by(dispatches.c.at.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
        return dict(row) if row is not None else None

    # ------------------------------------------------------------------ deliveries

    def count_delivery(
        self, run_id: str, generation: int, task: str, stage: int, shard: int, attempt: int
    ) -> int:
        """Count one more delivery of this attempt of a task; returns the count so far."""
        key = {
            "run_id": run_id,
            "generation": generation,
            "task": task,
            "stage": stage,
            "shard": shard,
            "attempt": attempt,
        }
        where = and_(*(deliveries.c[name] == value for name, value in key.items()))
        return upsert(
            self.engine,
            deliveries,
            key,
            {"count": deliveries.c.count + 1, "at": now()},
            {"count": 1},
            then=lambda conn: int(
                conn.execute(select(deliveries.c.count).where(where)).scalar_one()
            ),
        )

    def last_delivery_at(self, run_id: str, generation: int) -> float | None:
        """When a task of the run's `generation` was last delivered to a worker (None: never)."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.max(deliveries.c.at)).where(
                    and_(deliveries.c.run_id == run_id, deliveries.c.generation == generation)
                )
            ).scalar()

    def list_deliveries(self, run_id: str) -> list[dict[str, Any]]:
        """Delivery counts of the run's tasks, oldest first."""
        with self.engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    select(deliveries)
                    .where(deliveries.c.run_id == run_id)
                    .order_by(deliveries.c.at)
                ).mappings()
            ]

    # ------------------------------------------------------------------ heartbeats

    def beat(
        self,
        task_id: str,
        run_id: str,
        generation: int,
        task: str,
        stage: int,
        shard: int = -1,
        worker: str = "",
    ) -> None:
        """Record that `task_id` is alive now (its first beat inserts its row)."""
        at = now()
        upsert(
            self.engine,
            heartbeats,
            {"task_id": task_id},
            {"run_id": run_id, "generation": generation, "beat_at": at},
            {"task": task, "stage": stage, "shard": shard, "worker": worker, "started_at": at},
        )

    def end_beat(self, task_id: str) -> None:
        """The task ended (whichever way): it no longer counts as running."""
        with self.engine.begin() as conn:
            conn.execute(heartbeats.delete().where(heartbeats.c.task_id == task_id))

    def list_heartbeats(self, run_id: str) -> list[dict[str, Any]]:
        """The run's running (or dead) tasks, any generation, oldest beat first."""
        with self.engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    select(heartbeats)
                    .where(heartbeats.c.run_id == run_id)
                    .order_by(heartbeats.c.beat_at)
                ).mappings()
            ]

    def silent_runs(self, older_than: float, run_id: str | None = None) -> list[dict[str, Any]]:
        """Active runs (running or cancelling) with tasks of their current generation started,
        none of which has beaten since `older_than`: every process working on them died.

        Each: `run_id`, `status`, `generation`, `beat_at` (the newest beat) and the task,
        stage and shard of that newest beat."""
        live = (
            select(heartbeats.c.run_id, func.max(heartbeats.c.beat_at).label("beat_at"))
            .select_from(
                heartbeats.join(
                    runs,
                    and_(
                        runs.c.id == heartbeats.c.run_id,
                        runs.c.generation == heartbeats.c.generation,
                    ),
                )
            )
            .where(runs.c.status.in_((RunStatus.RUNNING.value, CANCELLING.value)))
            .group_by(heartbeats.c.run_id)
            .having(func.max(heartbeats.c.beat_at) < older_than)
        )
        if run_id is not None:
            live = live.where(heartbeats.c.run_id == run_id)
        newest = live.subquery()
        q = (
            select(
                runs.c.id.label("run_id"),
                runs.c.status,
                runs.c.generation,
                newest.c.beat_at,
                heartbeats.c.task,
                heartbeats.c.stage,
                heartbeats.c.shard,
                heartbeats.c.worker,
            )
            .select_from(
                newest.join(runs, runs.c.id == newest.c.run_id).join(
                    heartbeats,
                    and_(
                        heartbeats.c.run_id == runs.c.id,
                        heartbeats.c.generation == runs.c.generation,
                        heartbeats.c.beat_at == newest.c.beat_at,
                    ),
                )
            )
            .order_by(runs.c.id)
        )
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(q).mappings():
                out.setdefault(r["run_id"], dict(r))  # two tasks beat at the same instant
        return list(out.values())

    def clear_heartbeats(self, run_id: str, below_generation: int) -> None:
        """Forget the rows of the run's older generations (their tasks are dead or stale)."""
        with self.engine.begin() as conn:
            conn.execute(
                heartbeats.delete().where(
                    and_(heartbeats.c.run_id == run_id, heartbeats.c.generation < below_generation)
                )
            )
