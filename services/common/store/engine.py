"""Opening the store: the engine for a URL, its schema brought up to date by the migrations,
and the helpers every repository shares (the clock, JSON without NaN, one upsert)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

from sqlalchemy import Table, and_, create_engine, event, insert, inspect, update
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.pool import StaticPool

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATING = threading.Lock()  # Alembic's `context` and `op` are process-wide: one at a time


def now() -> float:
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


@overload
def upsert(
    engine: Engine,
    table: Table,
    key: dict[str, Any],
    changes: dict[str, Any],
    first: dict[str, Any],
    then: Callable[[Connection], T],
) -> T: ...


@overload
def upsert(
    engine: Engine,
    table: Table,
    key: dict[str, Any],
    changes: dict[str, Any],
    first: dict[str, Any],
    then: None = None,
) -> None: ...


def upsert(
    engine: Engine,
    table: Table,
    key: dict[str, Any],
    changes: dict[str, Any],
    first: dict[str, Any],
    then: Callable[[Connection], T] | None = None,
) -> T | None:
    """In one transaction: update the row of `table` at `key` with `changes`, or insert it
    (`key`, `changes`, and `first`, which overrides `changes`) if there is none; then
    `then(conn)`, whose result is
    returned. Two processes inserting the same first row at once: the loser's insert fails
    on the primary key, and its second round is an update."""
    where = and_(*(table.c[name] == value for name, value in key.items()))
    for attempt in range(2):
        try:
            with engine.begin() as conn:
                if conn.execute(update(table).where(where).values(**changes)).rowcount == 0:
                    conn.execute(insert(table).values({**key, **changes, **first}))
                return then(conn) if then is not None else None
        except IntegrityError:
            if attempt == 1:
                raise
    return None  # pragma: no cover - the loop returns or raises


def migrate(engine: Engine, attempts: int = 5) -> None:
    """Bring the database to the newest schema revision (Alembic, `migrations/`). A store
    created before revisions were recorded (its tables, no `alembic_version`) is stamped as
    the first revision, which is what it holds. The api and the workers start together and
    all do this: one may create a table between another's check and its CREATE, which
    fails that CREATE; the next attempt then finds the revision recorded."""
    from alembic import command
    from alembic.config import Config

    for attempt in range(attempts):
        try:
            with _MIGRATING, engine.begin() as conn:
                cfg = Config()
                cfg.set_main_option("script_location", str(MIGRATIONS))
                cfg.attributes["connection"] = conn
                tables = set(inspect(conn).get_table_names())
                if "runs" in tables and "alembic_version" not in tables:
                    command.stamp(cfg, "0001")
                command.upgrade(cfg, "head")
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
