"""The `data:` section: the pool, the tokenizer, the reference and held-out sets; and what
every section shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A run's or a named set's name: it becomes part of run IDs and file names."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _no_nul(v: Any) -> Any:
    # the OS refuses such a path with a bare ValueError when it is first resolved
    if isinstance(v, str) and "\x00" in v:
        raise ValueError("a path cannot contain a NUL character")
    return v


FilePath = Annotated[Path, BeforeValidator(_no_nul)]
PathText = Annotated[str, BeforeValidator(_no_nul)]


class HeldoutSetConfig(Section):
    name: str = Field(pattern=NAME_PATTERN, description="Set name in metrics.")
    path: FilePath = Field(
        description="JSONL {context, continuation} (cloze), JSONL {text} or .txt (text)."
    )
    kind: Literal["cloze", "text"] = Field(
        description="'cloze': loss and top-1 accuracy of the continuation only; 'text': mean "
        "per-token loss over every token of whole documents (long ones cut into sequences)."
    )
    max_documents: int | None = Field(None, ge=1, description="Use only the first N rows.")


class DataConfig(Section):
    pool: FilePath | Annotated[list[FilePath], Field(min_length=1)] = Field(
        description="Candidate pool, rows {id, text, ...}: a file, a glob (`shards/*.jsonl.zst`) "
        "or a list of them, each JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, or a folder "
        "saved by Hugging Face `datasets` (`save_to_disk`); read in list order, a glob's "
        "matches sorted; IDs unique across all shards."
    )
    reference: FilePath = Field(
        description="Reference task probed by the oracle: JSONL {context, continuation} (cloze), "
        "JSONL {text} documents or plain text (full text; see `reference_kind`)."
    )
    reference_kind: Literal["auto", "cloze", "text"] = Field(
        "auto",
        description="How the oracle reads `reference`: 'cloze' (loss on each "
        "continuation), 'text' (loss on every token of whole documents, long ones cut into "
        "sequences); 'auto': text for a .txt file, else cloze.",
    )
    heldout: FilePath | None = Field(
        None,
        description="Held-out evaluation set (same formats), never used for probing; "
        "the set named 'heldout' (optional when `heldout_sets` lists others).",
    )
    heldout_sets: list[HeldoutSetConfig] = Field(
        default_factory=list,
        description="More named held-out sets, each cloze (continuation loss and top-1 accuracy) "
        "or full text (mean per-token loss over whole documents).",
    )
    primary_heldout: str | None = Field(
        None,
        description="Name of the held-out set that `heldout_loss` and comparisons read "
        "(default: the first of `heldout_sets`, else 'heldout').",
    )
    tokenizer: PathText = Field(
        "train-bpe",
        description="'train-bpe' trains a byte-level BPE on the pool; otherwise a tokenizer directory.",
    )
    vocab_size: int = Field(8192, ge=256, le=262144, description="Vocabulary size for 'train-bpe'.")
    id_field: str = Field("id", description="Corpus column holding the document ID.")
    text_field: str = Field("text", description="Corpus column holding the document text.")
    domain_field: str | None = Field(
        "domain", description="Optional corpus column with a domain label, used in reports."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="Corrupt corpus rows: fail naming file and line, or skip and count."
    )
    chunk_tokens: int | None = Field(
        None,
        ge=8,
        description="Split every document longer than this many tokens into chunks "
        "at paragraph, line, sentence or word boundaries, once when the corpus is prepared (IDs "
        "`<doc id>#<n>`), so the oracle, the influence model and the trainer see the same unit of "
        "text; at most `train.seq_tokens`. None keeps whole documents.",
    )

    @model_validator(mode="after")
    def _heldout_named(self) -> DataConfig:
        names = ["heldout"] if self.heldout is not None else []
        names += [h.name for h in self.heldout_sets]
        if not names:
            raise ValueError(
                "`data.heldout` is required (or list named sets in `data.heldout_sets`)"
            )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"`data.heldout_sets` names must be unique ('heldout' is `data.heldout`), "
                f"got {dup} twice"
            )
        if self.primary_heldout is not None and self.primary_heldout not in names:
            raise ValueError(
                f"`data.primary_heldout` {self.primary_heldout!r} names no held-out set "
                f"(sets: {names})"
            )
        return self

    @property
    def primary(self) -> str:
        if self.primary_heldout:
            return self.primary_heldout
        return self.heldout_sets[0].name if self.heldout_sets else "heldout"

    def heldout_specs(self) -> list[HeldoutSetConfig]:
        """Every held-out set, `data.heldout` first as the set named 'heldout'."""
        specs = list(self.heldout_sets)
        if self.heldout is not None:
            kind = "text" if self.heldout.suffix == ".txt" else "cloze"
            specs.insert(0, HeldoutSetConfig(name="heldout", path=self.heldout, kind=kind))
        return specs
