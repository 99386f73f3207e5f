"""Request and response bodies of the scorer's HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator


class Document(BaseModel):
    id: str = Field(description="the document's ID, unique within the request")
    text: str = Field(description="the document's text")

    @field_validator("id")
    @classmethod
    def _id_not_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("document id must not be empty")
        return v


class ScoreRequest(BaseModel):
    model: str = Field(description="`<run_id>/<stage>` or `<run_id>/latest`",
                       examples=["tiny-1a2b3c4d/latest"])
    documents: list[Document] = Field(description="the documents to score, IDs unique")

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


class DocumentScore(BaseModel):
    id: str
    score: float = Field(description="influence-model output in z-units; lower is more helpful")


class ScoreResponse(BaseModel):
    model: str = Field(description="the resolved model version, `<run_id>/<stage>`")
    scores: list[DocumentScore] = Field(description="one score per document, in request order")


class ModelInfo(BaseModel):
    version: str = Field(description="`<run_id>/<stage>`")
    run_id: str
    stage: int
    path: str = Field(description="the model directory in the artifact store")
    fit: dict | None = Field(None, description="the fit report (val_spearman, ...) if recorded")
