"""Registered influence-model versions, and the small facts the services share (the broker's
marker)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from services.common.store.engine import finite_json, now, upsert
from services.common.store.records import ModelVersionRow
from services.common.store.runs import num_probes_of
from services.common.store.schema import model_versions, service_state


class Catalog:
    """Model versions and service state (a part of `Store`)."""

    engine: Engine
    get_generation: Callable[[str], int]  # RunRecords': raises for an unknown run

    def get_state(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(service_state.c.value).where(service_state.c.key == key)
            ).scalar()

    def put_state(self, key: str, value: str) -> None:
        upsert(self.engine, service_state, {"key": key}, {"value": value, "at": now()}, {})

    # ------------------------------------------------------------------ model versions

    def register_model(self, run_id: str, stage: int, path: str, fit: dict[str, Any]) -> bool:
        """Record `<run_id>/<stage>`; False (and no second row) if it is registered already."""
        fit = finite_json(fit)
        row = {
            "version": f"{run_id}/{stage}",
            "run_id": run_id,
            "stage": int(stage),
            "path": str(path),
            "val_spearman": fit.get("val_spearman"),
            "val_pearson": fit.get("val_pearson"),
            "num_probes": num_probes_of(fit),
            "fit": fit,
            "created_at": now(),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(model_versions).values(**row))
        except IntegrityError:
            self.get_generation(run_id)  # a foreign-key failure: raises for an unknown run
            return False
        return True

    def list_models(self, run_id: str | None = None) -> list[ModelVersionRow]:
        q = select(model_versions).order_by(
            model_versions.c.created_at.desc(), model_versions.c.stage.desc()
        )
        if run_id is not None:
            q = q.where(model_versions.c.run_id == run_id)
        with self.engine.connect() as conn:
            return [cast(ModelVersionRow, dict(r)) for r in conn.execute(q).mappings()]
