"""Runs: submit, list, show, cancel, resume; metrics and selections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, HTTPException, Query, status

from mates.artifacts import RunPaths, read_json
from mates.config import RunConfig, config_from_dict
from mates.data.sources import expand_pool
from mates.errors import ArtifactError, ConfigError, DataError
from services.api.deps import KeyRequired, ReadKey, RunId, SettingsDep, StoreDep
from services.api.schemas import Problem, Run, RunMetrics, RunStatus, RunSummary
from services.common import lifecycle
from services.common.store import Store, finite_json
from services.common.store.records import RunDetail
from services.common.store.records import RunSummary as RunSummaryRow

router = APIRouter(prefix="/v1/runs", tags=["runs"])

DATA_FILES = ("reference", "heldout")  # and the pool's shards
MAX_OFFSET = 2**31 - 1  # a bigger one overflows the database's integer (a 500 before)

EXAMPLE_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {
        "pool": "/data/demo/pool.jsonl",
        "reference": "/data/demo/reference.jsonl",
        "heldout": "/data/demo/heldout.jsonl",
        "vocab_size": 1024,
    },
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
    "stages": {"num_stages": 3, "stage0_steps": 20, "stage_steps": 10, "pool_docs": 200},
    "selection": {"method": "gumbel", "ratio": 0.2, "temperature": 0.5},
}

ConfigBody = Annotated[
    dict[str, Any],
    Body(
        description="A run config with the sections of `configs/*.yaml`; data paths are paths on "
        "the server (relative ones resolve against the API's working directory).",
        examples=[EXAMPLE_CONFIG],
    ),
]

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no run with that ID"}
}
AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no bearer API key"},
    403: {"model": Problem, "description": "a wrong API key"},
}


def publish_config_schema(app: FastAPI) -> None:
    """`POST /v1/runs` reads its body as a plain object, so that the library validates it
    with its own messages (naming each field) and then checks the data files on this
    server. Its published schema is the run config's own (every field, description and
    bound), so a generated client can validate before it sends."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        config = RunConfig.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in {**config.pop("$defs", {}), "RunConfig": config}.items():
            if components.setdefault(name, definition) != definition:
                raise RuntimeError(f"OpenAPI component {name!r} is defined twice")
        media = schema["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
        media["schema"] = {"$ref": "#/components/schemas/RunConfig"}
        media["example"] = EXAMPLE_CONFIG
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def validate_run_config(raw: dict[str, Any]) -> RunConfig:
    """The config as the library validates it, plus: its data files exist on this server."""
    try:
        cfg = config_from_dict(raw, base_dir=Path.cwd())
    except ValueError as e:  # resolving a path the OS refuses (a NUL byte); was a 500
        raise ConfigError(
            f"`data`: a path in it is not usable on this server ({e})", fields=[("data",)]
        ) from None
    try:
        expand_pool(cfg.data.pool)
    except DataError as e:  # a shard missing, a glob matching nothing: named
        raise ConfigError(f"`data.pool`: {e} on the server", fields=[("data", "pool")]) from None
    for name in DATA_FILES:
        path = getattr(cfg.data, name)
        if not path.is_file():
            raise ConfigError(
                f"`data.{name}`: {path} does not exist on the server", fields=[("data", name)]
            )
    tok = cfg.data.tokenizer
    if tok != "train-bpe" and not Path(tok).is_dir():
        field = "data.tokenizer"
        raise ConfigError(
            f"`{field}`: {tok} is not a directory on the server", fields=[tuple(field.split("."))]
        )
    return cfg


def run_or_404(store: Store, run_id: str) -> RunDetail:
    run = store.get_run(run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no run {run_id!r}")
    return run


def read_log(path: Path) -> list[dict[str, Any]]:
    """Rows of an append-only JSONL log; a last line still being written is left out."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        return [finite_json(json.loads(line)) for line in lines[:-1] if line.strip()]
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSONL: {e}") from None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Run,
    responses={**AUTH, 422: {"model": Problem, "description": "invalid config"}},
)
def submit_run(
    config: ConfigBody, store: StoreDep, settings: SettingsDep, _: KeyRequired
) -> RunDetail:
    """Validate a run config, create the run and queue its stage 0."""
    return lifecycle.create_run(store, settings, validate_run_config(config))


@router.get("", response_model=list[RunSummary])
def list_runs(
    store: StoreDep,
    _: ReadKey,
    status_: Annotated[RunStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[RunSummaryRow]:
    """Runs, newest first."""
    return store.list_runs(status=status_, limit=limit, offset=offset)


@router.get("/{run_id}", response_model=Run, responses=NOT_FOUND)
def get_run(run_id: RunId, store: StoreDep, _: ReadKey) -> RunDetail:
    """A run with every stage's state, transitions, timings, metrics and error."""
    return run_or_404(store, run_id)


@router.post(
    "/{run_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Run,
    responses={**AUTH, **NOT_FOUND, 409: {"model": Problem, "description": "not active"}},
)
def cancel_run(run_id: RunId, store: StoreDep, settings: SettingsDep, _: KeyRequired) -> RunDetail:
    """Ask an active run to stop; its status is `cancelling` until the worker stops it."""
    run_or_404(store, run_id)
    return lifecycle.cancel_run(store, settings, run_id)


@router.post(
    "/{run_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Run,
    responses={
        **AUTH,
        **NOT_FOUND,
        409: {"model": Problem, "description": "neither failed nor cancelled"},
    },
)
def resume_run(run_id: RunId, store: StoreDep, settings: SettingsDep, _: KeyRequired) -> RunDetail:
    """Queue a failed or cancelled run again from its last completed step."""
    run_or_404(store, run_id)
    return lifecycle.resume_run(store, settings, run_id)


@router.get("/{run_id}/metrics", response_model=RunMetrics, responses=NOT_FOUND)
def run_metrics(run_id: RunId, store: StoreDep, _: ReadKey) -> dict[str, Any]:
    """The run's metrics log (held-out and reference losses over steps) and stage summaries."""
    run = run_or_404(store, run_id)
    rows = read_log(RunPaths(Path(run["artifacts_dir"])).metrics)
    return {
        "run_id": run_id,
        "rows": rows,
        "stages": [{"stage": s["stage"], "metrics": s["metrics"]} for s in run["stages"]],
    }


@router.get(
    "/{run_id}/stages/{stage}/selection",
    response_model=dict[str, Any],
    responses={404: {"model": Problem, "description": "no such run or stage, or not selected yet"}},
)
def stage_selection(run_id: RunId, stage: int, store: StoreDep, _: ReadKey) -> dict[str, Any]:
    """The selection manifest of the documents stage `stage` trains on."""
    run = run_or_404(store, run_id)
    if not 0 <= stage < run["num_stages"]:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"run {run_id!r} has no stage {stage} (its stages are 0..{run['num_stages'] - 1})",
        )
    path = RunPaths(Path(run["artifacts_dir"])).selection(stage)
    if not path.is_file():
        state = next((s["state"] for s in run["stages"] if s["stage"] == stage), "unknown")
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"stage {stage} of run {run_id!r} has no selection yet (stage state: {state})",
        )
    return read_json(path)
