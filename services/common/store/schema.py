"""The run store's tables (SQLAlchemy Core). Every change to them comes with a migration in
`migrations/versions/`; a test upgrades an empty database and compares it with these."""

from __future__ import annotations

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
)

REVISION = "0001"
"""The migration that brings a database to these tables."""

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
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
    "stages",
    metadata,
    Column("run_id", String(128), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("stage", Integer, primary_key=True),
    Column("state", String(32), nullable=False),
    Column("error", Text),
    Column("timings", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)

transitions = Table(
    "transitions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("stage", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("at", Float, nullable=False),
    Column("reason", Text),
    Index("ix_transitions_run_stage", "run_id", "stage"),
)

model_versions = Table(
    "model_versions",
    metadata,
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
    "dispatches",
    metadata,
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
    "deliveries",
    metadata,
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
    "heartbeats",
    metadata,
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
    "service_state",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("value", Text, nullable=False),
    Column("at", Float, nullable=False),
)
