"""The wire contracts shared by the API, the scorer and the workers, each defined once
here: the run-ID pattern, the run status vocabulary, the task names and queues, and the
scorer's request and response bodies with its model-version header."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field, field_validator

from mates.manifest import RunStatus, StageState

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""What a run ID can be (`<name>-<8 hex>`, the name as `RunConfig.name` allows). IDs are
only ever looked up, never joined into a path, and anything else (`..`, `/`, NUL, `%`) is
refused at the edge: 422 in the API, and in the scorer's `model` string."""


def random_baseline_name(name: str) -> str:
    """The name of a run's random baseline when both were submitted through the API: the
    dashboard overlays `<name>-random` on run `<name>` (names are at most 64 characters)."""
    return f"{name}-random"[:64]


def stages_done(current_stage: int, stage_state: str | None) -> int:
    """How many of a run's stages have ended `done`, from its current stage and that stage's
    state: what `mates runs list` and the dashboard show as `k/n`."""
    return current_stage + (1 if stage_state == StageState.DONE else 0)


# --------------------------------------------------------------------------- run status

CANCELLING = RunStatus.CANCELLING
"""The one status the services add to the library's: a cancel was asked, the worker holding
the run has not stopped yet."""
STATUSES: tuple[RunStatus, ...] = tuple(RunStatus)
ACTIVE = (RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING)
"""What a cancel can stop."""
WAITING_ON_BROKER = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.CANCELLING)
"""Active runs whose next step is a task in the broker."""
RESUMABLE = (RunStatus.FAILED, RunStatus.CANCELLED)
FINAL = (RunStatus.DONE, RunStatus.FAILED, RunStatus.CANCELLED)
STATUS_DOC = ", ".join(STATUSES[:-1]) + " or " + STATUSES[-1]


class Outcome(StrEnum):
    """What a stage task returns (its Celery result) when it does not name the next step."""

    SKIPPED = "skipped"  # not for the run's current generation, or the run is gone
    DONE_ALREADY = "done already"  # a redelivery of a step that had finished
    FANNED_OUT = "fanned out"  # the fit enqueued the pool's scoring shards
    SCORED = "scored"
    SELECTED = "selected"
    CANCELLED = "cancelled"
    POISONED = "poisoned"  # delivered too often: the run was failed instead


# --------------------------------------------------------------------------- tasks and queues

TRAIN, FIT, SCORE = "train", "fit", "score"
TASK_QUEUES = {
    "mates.train_stage": TRAIN,
    "mates.fit_influence_model": FIT,
    "mates.score_shard": SCORE,
    "mates.select": FIT,
}
"""Each task's queue: the trainer consumes `train` (one job per GPU), the workers `fit`
(influence-model fits and the select chord callback) and `score` (pool shards)."""

# --------------------------------------------------------------------------- the scorer


MODEL_PATTERN = RUN_ID_PATTERN.removesuffix("$") + r"/(latest|[0-9]+)$"
"""What a `model` string can be: `<run_id>/<stage>` or `<run_id>/latest`."""


class Document(BaseModel):
    # the schema says what the validator below enforces (with its own message)
    id: str = Field(
        description="the document's ID, unique within the request",
        json_schema_extra={"minLength": 1},
    )
    text: str = Field(description="the document's text")

    @field_validator("id")
    @classmethod
    def _id_not_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("document id must not be empty")
        return v


class ScoreRequest(BaseModel):
    model: str = Field(
        description="`<run_id>/<stage>` or `<run_id>/latest`",
        examples=["tiny-1a2b3c4d/latest"],
        # enforced by the scorer's parse_model, whose 422 names what is wrong
        json_schema_extra={"pattern": MODEL_PATTERN},
    )
    documents: list[Document] = Field(
        description="the documents to score (at least one), IDs unique",
        # the schema states what the validator below enforces with its own messages
        json_schema_extra={"minItems": 1, "uniqueItems": True},
    )

    @field_validator("documents")
    @classmethod
    def _documents_ok(cls, docs: list[Document]) -> list[Document]:
        if not docs:
            raise ValueError("documents must not be empty")
        seen: set[str] = set()
        for d in docs:
            if d.id in seen:
                raise ValueError(f"duplicate document id {d.id!r}")
            seen.add(d.id)
        return docs


class Problem(BaseModel):
    """The body of every error answer but a 422."""

    detail: str = Field(description="what went wrong, naming the field or resource")


AUTH_RESPONSES: dict[int | str, dict] = {
    401: {"model": Problem, "description": "no bearer API key"},
    403: {"model": Problem, "description": "a wrong API key"},
}
"""OpenAPI `responses` of a route that takes the bearer key."""


class DocumentScore(BaseModel):
    id: str
    score: float = Field(description="influence-model output in z-units; lower is more helpful")


MODEL_VERSION_HEADER = "X-Model-Version"
"""The response header of `POST /v1/score` naming the resolved version, `<run_id>/<stage>`."""

SCORE_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "one `{id, score}` per document, in request order; the resolved model "
        f"version is in the `{MODEL_VERSION_HEADER}` header",
        "headers": {
            MODEL_VERSION_HEADER: {
                "description": "the model version that scored the documents, `<run_id>/<stage>` "
                "(`latest` resolved)",
                "schema": {"type": "string", "examples": ["tiny-1a2b3c4d/1"]},
            }
        },
    },
    **AUTH_RESPONSES,
    404: {"model": Problem, "description": "no such run, stage or model version"},
    413: {"model": Problem, "description": "too many documents or characters (names the limit)"},
}
"""OpenAPI `responses` entry of `POST /v1/score`, shared by the scorer and the API."""


class ModelInfo(BaseModel):
    version: str = Field(description="`<run_id>/<stage>`")
    run_id: str
    stage: int
    path: str = Field(description="the model directory in the artifact store")
    fit: dict | None = Field(None, description="the fit report (val_spearman, ...) if recorded")
