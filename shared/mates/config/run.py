"""`RunConfig`, the whole run's config, and reading one: YAML, `--set` overrides, presets."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from mates.config.data import NAME_PATTERN, DataConfig, Section
from mates.config.selection import CompareConfig, InfluenceConfig, ProbingConfig, SelectionConfig
from mates.config.training import ModelConfig, StagesConfig, TrackingConfig, TrainConfig
from mates.errors import ConfigError

PRESETS = Path(__file__).parent.parent / "configs"
"""The preset configs shipped with the package (`configs/` in the repository links here)."""


# (section, field) added after the first runs were made: see RunConfig.fingerprint
ADDED_FIELDS = (
    ("model", "vocab_multiple"),
    ("data", "heldout_sets"),
    ("data", "primary_heldout"),
    ("train", "cooldown_fraction"),
    ("selection", "sampler"),
    ("selection", "seed"),
    ("selection", "target_labels"),
    ("compare", None),
    ("data", "reference_kind"),
    ("probing", "precision"),
    ("influence", "head_fit"),
    ("influence", "cv_folds"),
    ("selection", "fallback"),
    ("selection", "min_cv_spearman"),
    ("data", "chunk_tokens"),
    ("stages", "stage0_tokens"),
    ("stages", "stage_tokens"),
    ("stages", "pool_multiple"),
)


class RunConfig(Section):
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
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _chunks_fit_the_context(self) -> RunConfig:
        c, T = self.data.chunk_tokens, self.train.seq_tokens
        if c is not None and c > T:
            raise ValueError(
                f"`data.chunk_tokens` ({c}) is above the model's context "
                f"(`train.seq_tokens` = {T}): a chunk must fit one training sequence"
            )
        return self

    def stage_steps(self, k: int) -> int:
        """Optimizer steps of stage k: as configured, or its token budget in whole batches."""
        st = self.stages
        if not st.token_budgets:
            return st.stage0_steps if k == 0 else st.stage_steps
        tokens = st.stage0_tokens if k == 0 else st.stage_tokens
        assert tokens is not None, "token_budgets needs both token budgets (validated)"
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
            raise ValueError(
                f"`probing.num_probes` ({self.probing.num_probes}) must be at least {need}: "
                f"`influence.cv_folds` = {self.influence.cv_folds} needs two probes per fold"
            )
        return self

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the named sections (all when none), to tell comparable runs apart.

        A field added after runs were made with this code (ADDED_FIELDS) counts only when
        it is set away from its default: a run made before it existed keeps its fingerprint,
        and so can still be resumed.
        """
        dumped = self.model_dump(mode="json")
        dumped.pop("tracking")  # where figures are sent is no part of what a run computes
        for section, name in ADDED_FIELDS:
            if name is None:  # a whole section
                if getattr(self, section) == type(getattr(self, section))():
                    del dumped[section]
                continue
            sec = getattr(self, section)
            if getattr(sec, name) == type(sec).model_fields[name].get_default(
                call_default_factory=True
            ):
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
        elif (
            isinstance(got, (dict, list))
            or msg.endswith(f"got {got}")
            or e["type"] == "value_error"
        ):
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
        raise ConfigError(
            _format_validation_error(e), fields=[tuple(x["loc"]) for x in e.errors()]
        ) from None
    if base_dir is not None:
        pool = cfg.data.pool
        if isinstance(pool, list):
            cfg.data.pool = [p if p.is_absolute() else (base_dir / p).resolve() for p in pool]
        elif not pool.is_absolute():
            cfg.data.pool = (base_dir / pool).resolve()
        for name in ("reference", "heldout"):
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
