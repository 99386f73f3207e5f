"""One typed config for a MATES run: YAML file + `--set key=value` overrides.

Every field has a description; validation errors name the dotted field to change,
e.g. "`selection.ratio` must be in (0, 1], got 1.5". One module per group of sections
(`data`, `training`, `selection`) and `run` (the whole config, loading, overrides,
presets); this package re-exports them.
"""

from mates.config.data import (
    NAME_PATTERN,
    DataConfig,
    FilePath,
    HeldoutSetConfig,
    PathText,
    Section,
)
from mates.config.run import (
    ADDED_FIELDS,
    PRESETS,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
)
from mates.config.selection import (
    COMPARE_ARMS,
    SELECTION_METHODS,
    CompareConfig,
    InfluenceConfig,
    ProbingConfig,
    SelectionConfig,
    SelectionMethod,
)
from mates.config.training import ModelConfig, StagesConfig, TrackingConfig, TrainConfig

__all__ = [
    "ADDED_FIELDS",
    "COMPARE_ARMS",
    "CompareConfig",
    "DataConfig",
    "FilePath",
    "HeldoutSetConfig",
    "InfluenceConfig",
    "ModelConfig",
    "NAME_PATTERN",
    "PRESETS",
    "PathText",
    "ProbingConfig",
    "RunConfig",
    "SELECTION_METHODS",
    "SelectionMethod",
    "Section",
    "SelectionConfig",
    "StagesConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_override",
]
