"""Service settings, read from `MATES_*` environment variables (documented in the README)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_KEY = "change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MATES_", extra="ignore")

    # -- security
    api_key: str = Field(PLACEHOLDER_KEY, description="bearer key for mutating endpoints")
    dev: bool = Field(False, description="development mode: allows the placeholder key")
    read_auth: bool = Field(False, description="also require the key on read endpoints")

    # -- where things live
    database_url: str = Field(
        "sqlite:///runs/mates.db", description="SQLAlchemy URL of the run store"
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    result_backend: str | None = Field(
        None, description="Celery result backend (default: the broker)"
    )
    artifacts_dir: Path = Field(Path("runs/artifacts"), description="root of the artifact store")

    # -- bind addresses
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    scorer_host: str = "127.0.0.1"
    scorer_port: int = 8001

    # -- the HTTP edge of the API and the scorer
    max_body_bytes: int = Field(
        64 * 2**20,
        ge=1024,
        description="request bodies over this many bytes are refused "
        "with 413 before they are read (a declared Content-Length) or as they stream in",
    )
    cors_origins: str = Field(
        "",
        description="comma-separated origins allowed to call the API and the scorer from "
        "a browser, e.g. https://a.example,https://b.example; empty: no CORS headers at all",
    )

    # -- pool scoring by the workers
    scorer_url: str = Field(
        "http://127.0.0.1:8001", description="scorer base URL (score_mode=http)"
    )
    score_mode: Literal["local", "http"] = Field(
        "local", description="score_shard loads the model itself (local) or calls the scorer (http)"
    )
    http_timeout_s: float = 120.0

    # -- the scorer
    scorer_max_documents: int = Field(1024, ge=1, description="documents per /v1/score request")
    scorer_max_chars: int = Field(100_000, ge=1, description="characters per document")
    scorer_cache_models: int = Field(4, ge=1, description="model versions held in memory (LRU)")
    scorer_batch_docs: int = Field(64, ge=1, description="documents per forward pass")
    scorer_batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    scorer_compile: bool = Field(
        False,
        description="torch.compile each loaded model (inductor, frozen weights): about 1.2x "
        "the documents/s on a CPU, after a one-off compile of seconds to tens of seconds per model",
    )

    # -- Celery workers
    worker_pool: Literal["threads", "solo", "prefork"] = Field(
        "prefork",
        description="pool of `mates serve worker` (fit + score queues); processes, "
        "because torch's RNG and thread settings are per process",
    )
    worker_concurrency: int = Field(2, ge=1, description="tasks at once in `mates serve worker`")
    visibility_timeout_s: int = Field(
        86_400,
        ge=1,
        description="unacknowledged tasks are redelivered after this long; must "
        "exceed the longest stage (tests use a few seconds)",
    )
    node_name: str | None = Field(
        None, description="Celery node name of `mates serve worker|trainer` (default: kind-pid)"
    )
    trainer_nproc: int = Field(
        1, ge=1, description="processes per stage job: >1 runs the training under torchrun (DDP)"
    )
    trainer_timeout_s: float | None = Field(
        None,
        gt=0,
        description="fail a torchrun stage job that runs longer than this (default: none)",
    )
    task_max_retries: int = Field(5, ge=0, description="retries of a task on a transient error")
    task_retry_backoff_s: int = Field(
        2,
        ge=1,
        description="first retry delay; it doubles per retry up to task_retry_backoff_max_s",
    )
    task_retry_backoff_max_s: int = Field(120, ge=1, description="longest delay between retries")
    task_retry_jitter: bool = Field(
        True, description="draw each retry delay at random up to its backoff (spreads a herd)"
    )
    task_max_deliveries: int = Field(
        5,
        ge=1,
        description="a task delivered more often than this (it kills its worker, e.g. "
        "out of memory) fails its run instead of being redelivered forever",
    )
    broker_watch_s: float = Field(
        5.0,
        gt=0,
        description="how often workers check that the broker kept its queues; a Redis "
        "restarted without persistence fails the runs whose tasks it lost (resumable)",
    )
    heartbeat_s: float = Field(
        10.0,
        gt=0,
        description="how often a running task (train_stage, fit, score_shard, select) "
        "records in the run store that its process is alive",
    )
    heartbeat_timeout_s: float = Field(
        120.0,
        gt=0,
        description="an active run whose started tasks have all been silent this long "
        "is failed (or, when cancelling, cancelled) as lost: their process was killed; resume it "
        "to continue from its last checkpoint. Must be several heartbeat_s",
    )
    stall_s: float = Field(
        900.0,
        gt=0,
        description="an active run with no task running and none delivered for this "
        "long since its last task was published has lost that task's message (a worker or "
        "Redis died between taking it from its queue and recording it as unacknowledged): "
        "the watch publishes it again once (for a stage's shards, their select, which scores "
        "any shard still missing). Tasks are idempotent, so a message that was merely waiting "
        "behind other work costs only a duplicate that does nothing",
    )
    soft_shutdown_s: float = Field(
        20.0,
        ge=0,
        description="on a cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT) "
        "running tasks get this long, then go back to the queue",
    )

    # -- compute
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch threads per process (0: torch's default)")

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_urls(cls, v: str) -> str:
        for origin in (o.strip() for o in v.split(",") if o.strip()):
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin {origin!r} must start with http:// or https://")
        return v

    @model_validator(mode="after")
    def _timeout_spans_heartbeats(self) -> Settings:
        if self.heartbeat_timeout_s < 3 * self.heartbeat_s:
            raise ValueError(
                f"MATES_HEARTBEAT_TIMEOUT_S ({self.heartbeat_timeout_s:g}) must be at least three "
                f"heartbeats (3 x MATES_HEARTBEAT_S = {3 * self.heartbeat_s:g}): one late beat "
                "must not fail a live run"
            )
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    def check_key(self) -> None:
        """Refuse to serve with the placeholder key unless in development mode."""
        if not self.api_key:
            raise SystemExit(
                "MATES_API_KEY is empty; set a key (or MATES_DEV=1 with the placeholder)"
            )
        if self.api_key == PLACEHOLDER_KEY and not self.dev:
            raise SystemExit(
                f"MATES_API_KEY is the placeholder {PLACEHOLDER_KEY!r}: set a real key, "
                "or MATES_DEV=1 for local development"
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
