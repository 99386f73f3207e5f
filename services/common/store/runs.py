"""Runs, their stages and transitions: created from a manifest, mirrored from every save of
`run.json`, and their status and generation changed atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import and_, case, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from mates.errors import RunStateError
from mates.manifest import RunRecord, RunStatus, StageRecord, StageState
from services.common.contracts import CANCELLING, FINAL
from services.common.store.engine import finite_json, now
from services.common.store.records import RunDetail, RunSummary, TransitionRow
from services.common.store.schema import runs, stages, transitions


def _known(status: RunStatus | str) -> RunStatus:
    try:
        return RunStatus(status)
    except ValueError:
        raise ValueError(f"unknown run status {status!r}") from None


class RunExists(RunStateError):
    """`create_run` was given an ID the store already holds."""


def _stage_row(run_id: str, st: Mapping[str, Any], at: float) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "stage": int(st["stage"]),
        "state": StageState(st["state"]).value,
        "error": st.get("error"),
        "timings": finite_json(st.get("timings") or {}),
        "metrics": finite_json(st.get("metrics") or {}),
        "updated_at": at,
    }


def _transition_rows(run_id: str, st: Mapping[str, Any], already: int) -> list[dict[str, Any]]:
    rows = []
    items = st.get("transitions") or []
    for i, t in enumerate(items[already:], start=already):
        reason = t.get("reason")
        ended = t["state"] in (StageState.FAILED, StageState.CANCELLED)
        if reason is None and i == len(items) - 1 and ended:
            reason = st.get("error")  # the stage's error explains its last failure
        rows.append(
            {
                "run_id": run_id,
                "stage": int(st["stage"]),
                "state": StageState(t["state"]).value,
                "at": float(t["at"]),
                "reason": reason,
            }
        )
    return rows


def num_probes_of(fit: dict[str, Any]) -> int | None:
    """Probes behind a fit: `num_probes` if recorded, else its train + validation sizes."""
    if fit.get("num_probes") is not None:
        return int(fit["num_probes"])
    if fit.get("train_size") is not None and fit.get("val_size") is not None:
        return int(fit["train_size"]) + int(fit["val_size"])
    return None


class RunRecords:
    """The runs' rows (a part of `Store`)."""

    engine: Engine

    def create_run(self, manifest: RunRecord, artifacts_dir: str) -> None:
        run_id = manifest["run_id"]
        created = float(manifest.get("created_at") or now())
        row = {
            "id": run_id,
            "name": manifest["name"],
            "status": RunStatus(manifest.get("status", RunStatus.PENDING)).value,
            "error": manifest.get("error"),
            "current_stage": int(manifest.get("current_stage", 0)),
            "num_stages": len(manifest["stages"]),
            "generation": 0,
            "config": finite_json(manifest.get("config") or {}),
            "artifacts_dir": str(artifacts_dir),
            "created_at": created,
            "updated_at": float(manifest.get("updated_at") or created),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(runs).values(**row))
                self._sync_stages(conn, run_id, manifest["stages"], row["updated_at"], existing={})
        except IntegrityError:
            raise RunExists(f"run {run_id} already exists in the run store") from None

    def sync_manifest(self, manifest: RunRecord) -> None:
        """Mirror run.json: run status, stage rows, and the transitions not yet stored."""
        run_id = manifest["run_id"]
        new = RunStatus(manifest["status"]).value
        at = float(manifest.get("updated_at") or now())
        # A cancel request outlives progress reports until the run actually ends.
        status = new if new in FINAL else case((runs.c.status == CANCELLING, CANCELLING), else_=new)
        with self.engine.begin() as conn:
            # The UPDATE comes first: it takes the run's row (or SQLite's write) lock, so
            # two processes syncing the same run count and insert transitions in turn.
            done = conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(
                    status=status,
                    error=manifest.get("error"),
                    current_stage=int(manifest.get("current_stage", 0)),
                    num_stages=len(manifest["stages"]),
                    updated_at=at,
                )
            )
            if done.rowcount == 0:
                raise RunStateError(f"run {run_id} is not in the run store")
            existing = {
                r.stage: r.n
                for r in conn.execute(
                    select(transitions.c.stage, func.count().label("n"))
                    .where(transitions.c.run_id == run_id)
                    .group_by(transitions.c.stage)
                )
            }
            self._sync_stages(conn, run_id, manifest["stages"], at, existing)

    def _sync_stages(
        self,
        conn: Connection,
        run_id: str,
        items: Sequence[StageRecord],
        at: float,
        existing: dict[int, int],
    ) -> None:
        have = set(conn.execute(select(stages.c.stage).where(stages.c.run_id == run_id)).scalars())
        rows = [_stage_row(run_id, st, at) for st in items]
        fresh = [r for r in rows if r["stage"] not in have]
        if fresh:
            conn.execute(insert(stages), fresh)
        for r in rows:
            if r["stage"] in have:
                conn.execute(
                    update(stages)
                    .where(and_(stages.c.run_id == run_id, stages.c.stage == r["stage"]))
                    .values(
                        state=r["state"],
                        error=r["error"],
                        timings=r["timings"],
                        metrics=r["metrics"],
                        updated_at=at,
                    )
                )
        new_transitions = [
            t
            for st in items
            for t in _transition_rows(run_id, st, existing.get(int(st["stage"]), 0))
        ]
        if new_transitions:
            conn.execute(insert(transitions), new_transitions)

    def set_status(self, run_id: str, status: RunStatus, error: str | None = None) -> None:
        status = _known(status)
        with self.engine.begin() as conn:
            done = conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(status=status.value, error=error, updated_at=now())
            )
        if done.rowcount == 0:
            raise RunStateError(f"run {run_id} is not in the run store")

    def set_status_if(
        self, run_id: str, status: RunStatus, allowed: Sequence[RunStatus], error: str | None = None
    ) -> bool:
        """Set the status only if it is one of `allowed` (atomically); False otherwise."""
        status = _known(status)
        with self.engine.begin() as conn:
            done = conn.execute(
                update(runs)
                .where(
                    and_(runs.c.id == run_id, runs.c.status.in_([_known(a).value for a in allowed]))
                )
                .values(status=status.value, error=error, updated_at=now())
            )
        return done.rowcount == 1

    def get_run(self, run_id: str) -> RunDetail | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
            if row is None:
                return None
            stage_rows = (
                conn.execute(
                    select(stages).where(stages.c.run_id == run_id).order_by(stages.c.stage)
                )
                .mappings()
                .all()
            )
            trans = (
                conn.execute(
                    select(transitions)
                    .where(transitions.c.run_id == run_id)
                    .order_by(transitions.c.stage, transitions.c.id)
                )
                .mappings()
                .all()
            )
        by_stage: dict[int, list[TransitionRow]] = {}
        for t in trans:
            by_stage.setdefault(t["stage"], []).append(
                {"state": StageState(t["state"]), "at": t["at"], "reason": t["reason"]}
            )
        out = dict(row)
        out["status"] = RunStatus(row["status"])
        out["stages"] = [
            {
                "stage": s["stage"],
                "state": StageState(s["state"]),
                "error": s["error"],
                "timings": s["timings"],
                "metrics": s["metrics"],
                "updated_at": s["updated_at"],
                "transitions": by_stage.get(s["stage"], []),
            }
            for s in stage_rows
        ]
        return cast(RunDetail, out)

    def list_runs(
        self, status: RunStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[RunSummary]:
        """Run summaries, newest first, each with its current stage's state."""
        q = (
            select(
                runs.c.id,
                runs.c.name,
                runs.c.status,
                runs.c.error,
                runs.c.current_stage,
                runs.c.num_stages,
                runs.c.generation,
                runs.c.artifacts_dir,
                runs.c.created_at,
                runs.c.updated_at,
                stages.c.state.label("stage_state"),
            )
            .select_from(
                runs.outerjoin(
                    stages,
                    and_(stages.c.run_id == runs.c.id, stages.c.stage == runs.c.current_stage),
                )
            )
            .order_by(runs.c.created_at.desc(), runs.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        if status is not None:
            q = q.where(runs.c.status == RunStatus(status).value)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for r in rows:
            r["status"] = RunStatus(r["status"])
            r["stage_state"] = None if r["stage_state"] is None else StageState(r["stage_state"])
        return cast(list[RunSummary], rows)

    def count_by_status(self) -> dict[RunStatus, int]:
        """How many runs are in each status (every status, zero included)."""
        q = select(runs.c.status, func.count()).group_by(runs.c.status)
        with self.engine.connect() as conn:
            counts = {RunStatus(status): int(n) for status, n in conn.execute(q)}
        return {status: counts.get(status, 0) for status in RunStatus}

    def bump_generation(self, run_id: str) -> int:
        with self.engine.begin() as conn:
            done = conn.execute(
                update(runs).where(runs.c.id == run_id).values(generation=runs.c.generation + 1)
            )
            if done.rowcount == 0:
                raise RunStateError(f"run {run_id} is not in the run store")
            return int(
                conn.execute(select(runs.c.generation).where(runs.c.id == run_id)).scalar_one()
            )

    def bump_generation_from(self, run_id: str, generation: int) -> bool:
        """Bump the generation only if it is still `generation` (atomically): of several
        processes ending the same run, exactly one gets True."""
        with self.engine.begin() as conn:
            done = conn.execute(
                update(runs)
                .where(and_(runs.c.id == run_id, runs.c.generation == generation))
                .values(generation=runs.c.generation + 1)
            )
        return done.rowcount == 1

    def get_generation(self, run_id: str) -> int:
        with self.engine.connect() as conn:
            gen = conn.execute(select(runs.c.generation).where(runs.c.id == run_id)).scalar()
        if gen is None:
            raise RunStateError(f"run {run_id} is not in the run store")
        return int(gen)
