"""The run store: runs, stage states, transitions, model versions, task dispatches,
deliveries and the heartbeats of running tasks.

SQLite by default, PostgreSQL by URL. Several processes (the API, workers, the
trainer) share it, so every write that reads what it then changes takes the run's
row lock first (an UPDATE before the reads), and uniqueness is left to primary
keys: a second `claim_dispatch` or `register_model` of the same key loses cleanly.

`schema` holds the tables and `migrations/` the Alembic revisions that build them (a
store is brought to the newest on opening); `runs`, `tasks` and `catalog` are the
repositories `Store` is made of; `engine` the helpers they share.
"""

from __future__ import annotations

import functools

from sqlalchemy import text

from services.common.settings import get_settings
from services.common.store.catalog import Catalog
from services.common.store.engine import finite_json, make_engine, migrate, normalize_url
from services.common.store.runs import RunExists, RunRecords, num_probes_of
from services.common.store.tasks import TaskRecords

__all__ = ["RunExists", "Store", "default_store", "finite_json", "normalize_url", "num_probes_of"]


class Store(RunRecords, TaskRecords, Catalog):
    """The run store behind one SQLAlchemy URL, its schema migrated to the newest revision
    when opened."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


@functools.lru_cache(maxsize=1)
def default_store() -> Store:
    """The run store of this process's settings (`MATES_DATABASE_URL`), opened once."""
    return Store(get_settings().database_url)
