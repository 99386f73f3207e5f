"""The `model:`, `train:` and `stages:` sections: the LM, its optimizer and schedule, the
stages and their budgets."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mates.config.data import Section


class ModelConfig(Section):
    hidden_size: int = Field(256, ge=8, description="Transformer width.")
    num_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads per block.")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width (default 4x hidden).")
    rotary_pct: float = Field(0.25, gt=0, le=1, description="Fraction of head dims with RoPE.")
    init_std: float = Field(0.02, gt=0, description="Initializer standard deviation.")
    vocab_multiple: int = Field(
        1,
        ge=1,
        description="Pad the LM's vocabulary (embedding and output rows) up to a multiple "
        "of this; 128 keeps the output layer's GPU matmuls on aligned tensor-core kernels "
        "(Pythia pads its 50,277 tokens to 50,304).",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        return self


def _betas_schema(schema: dict[str, Any]) -> None:
    """The published schema states the bound `_betas_in_range` enforces."""
    for item in schema.get("prefixItems", []):
        item.update(minimum=0, exclusiveMaximum=1)


class TrainConfig(Section):
    seq_tokens: int = Field(256, ge=8, description="Tokens per training sequence (packed).")
    batch_sequences: int = Field(16, ge=1, description="Sequences per optimizer step (global).")
    micro_batch_sequences: int | None = Field(
        None, ge=1, description="Sequences per forward (gradient accumulation); default: all."
    )
    lr: float = Field(1e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    betas: tuple[float, float] = Field(
        (0.9, 0.95), description="AdamW betas, each in [0, 1).", json_schema_extra=_betas_schema
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps, then constant lr.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Autocast precision of training and evaluation: 'auto' is bf16 on "
        "CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32; on a CPU without it, "
        "bf16 is emulated and about 17x slower (measured on an AVX2-only AMD EPYC).",
    )
    eval_every_steps: int = Field(50, ge=1, description="Held-out/reference eval interval.")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Mid-stage checkpoint interval (0: only at stage end)."
    )
    eval_batch_sequences: int = Field(64, ge=1, description="Sequences per eval forward.")
    log_every_steps: int = Field(
        10,
        ge=1,
        description="Steps between read-backs of the training loss from the device (each one a "
        "host-device sync; also at eval and checkpoint steps and at stage end). A non-finite "
        "loss fails the stage at the next read-back.",
    )
    compile: bool = Field(
        False, description="torch.compile the training forward (the first steps pay the compile)."
    )
    cooldown_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
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


class StagesConfig(Section):
    num_stages: int = Field(
        4, ge=1, description="Stages in the run; stage 0 trains on random data."
    )
    stage0_steps: int = Field(200, ge=1, description="Optimizer steps in stage 0.")
    stage_steps: int = Field(100, ge=1, description="Optimizer steps in each later stage.")
    pool_docs: int = Field(2000, ge=1, description="Candidate documents drawn per stage.")
    pool_mode: Literal["disjoint", "resample"] = Field(
        "resample",
        description="'disjoint': each stage a fresh slice of the corpus; 'resample': each stage "
        "samples from documents not yet trained on.",
    )
    stage0_tokens: int | None = Field(
        None,
        ge=1,
        description="Token budget of stage 0 (with `stage_tokens`, instead of steps and "
        "pool documents): the stage trains ceil(tokens / (batch x seq)) steps, one epoch over a "
        "random selection that fills the budget.",
    )
    stage_tokens: int | None = Field(
        None,
        ge=1,
        description="Token budget of each later stage: its selection keeps documents "
        "until their tokens fill one epoch of the stage's steps.",
    )
    pool_multiple: float | None = Field(
        None,
        ge=1,
        description="With token budgets: each later stage's pool holds this many times "
        "the stage's budget (default 1 / `selection.ratio`); stage 0's pool is its budget.",
    )

    @model_validator(mode="after")
    def _one_kind_of_budget(self) -> StagesConfig:
        tokens = (self.stage0_tokens is not None, self.stage_tokens is not None)
        if any(tokens) and not all(tokens):
            raise ValueError("`stages.stage0_tokens` and `stages.stage_tokens` are set together")
        # set away from its default (a saved config repeats the defaults, and must load)
        steps = [
            n
            for n in ("stage0_steps", "stage_steps", "pool_docs")
            if getattr(self, n) != type(self).model_fields[n].default
        ]
        if all(tokens) and steps:
            raise ValueError(
                f"`stages.{steps[0]}` cannot be set beside token budgets "
                "(`stages.stage0_tokens`, `stages.stage_tokens`): give the budget one way"
            )
        if self.pool_multiple is not None and not all(tokens):
            raise ValueError("`stages.pool_multiple` needs token budgets (`stages.stage_tokens`)")
        return self

    @property
    def token_budgets(self) -> bool:
        return self.stage_tokens is not None


class TrackingConfig(Section):
    """Experiment tracking (off by default): the same figures as metrics.jsonl and the
    stage metrics, sent to TensorBoard event files and/or Weights & Biases."""

    tensorboard: bool = Field(
        False, description="Write TensorBoard event files to `<run>/tensorboard`."
    )
    wandb: bool = Field(False, description="Log to Weights & Biases (needs `wandb` installed).")
    wandb_project: str = Field("mates", min_length=1, description="The W&B project.")
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="'offline' writes the W&B run under `<run>/wandb` to sync later."
    )
    group: str | None = Field(
        None,
        description="Group of runs drawn together (W&B group); `mates compare` sets it to "
        "the comparison's name so one chart overlays its arms.",
    )
