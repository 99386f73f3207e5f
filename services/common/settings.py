"""Service settings, read from `MATES_*` environment variables (documented in the README)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_KEY = "change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MATES_", extra="ignore")

    # -- security
    api_key: str = Field(PLACEHOLDER_KEY, description="bearer key for mutating endpoints")
    dev: bool = Field(False, description="development mode: allows the placeholder key")
    read_auth: bool = Field(False, description="also require the key on read endpoints")

    # -- where things live
    database_url: str = Field("sqlite:///runs/mates.db", description="SQLAlchemy URL of the run store")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    result_backend: str | None = Field(None, description="Celery result backend (default: the broker)")
    artifacts_dir: Path = Field(Path("runs/artifacts"), description="root of the artifact store")

    # -- bind addresses
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    scorer_host: str = "127.0.0.1"
    scorer_port: int = 8001

    # -- pool scoring by the workers
    scorer_url: str = Field("http://127.0.0.1:8001", description="scorer base URL (score_mode=http)")
    score_mode: Literal["local", "http"] = Field(
        "local", description="score_shard loads the model itself (local) or calls the scorer (http)")
    http_timeout_s: float = 120.0

    # -- the scorer
    scorer_max_documents: int = Field(1024, ge=1, description="documents per /v1/score request")
    scorer_max_chars: int = Field(100_000, ge=1, description="characters per document")
    scorer_cache_models: int = Field(4, ge=1, description="model versions held in memory (LRU)")
    scorer_batch_docs: int = Field(64, ge=1, description="documents per forward pass")
    scorer_batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")

    # -- Celery workers
    worker_pool: Literal["threads", "solo", "prefork"] = Field(
        "prefork", description="pool of `mates serve worker` (fit + score queues); processes, "
        "because torch's RNG and thread settings are per process")
    worker_concurrency: int = Field(2, ge=1, description="tasks at once in `mates serve worker`")
    visibility_timeout_s: int = Field(
        86_400, ge=60, description="unacknowledged tasks are redelivered after this long; must "
        "exceed the longest stage")
    node_name: str | None = Field(
        None, description="Celery node name of `mates serve worker|trainer` (default: kind-pid)")
    trainer_nproc: int = Field(
        1, ge=1, description="processes per stage job: >1 runs the training under torchrun (DDP)")
    trainer_timeout_s: float | None = Field(
        None, gt=0, description="fail a torchrun stage job that runs longer than this (default: none)")
    task_max_retries: int = Field(5, ge=0, description="retries of a task on a transient error")
    soft_shutdown_s: float = Field(
        20.0, ge=0, description="on a cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT) "
        "running tasks get this long, then go back to the queue")

    # -- compute
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch threads per process (0: torch's default)")

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    def check_key(self) -> None:
        """Refuse to serve with the placeholder key unless in development mode."""
        if not self.api_key:
            raise SystemExit("MATES_API_KEY is empty; set a key (or MATES_DEV=1 with the placeholder)")
        if self.api_key == PLACEHOLDER_KEY and not self.dev:
            raise SystemExit(
                f"MATES_API_KEY is the placeholder {PLACEHOLDER_KEY!r}: set a real key, "
                "or MATES_DEV=1 for local development")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
