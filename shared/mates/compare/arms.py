"""The arms of a comparison: each arm's run config at a seed, the checks before any
training, the seeds, and where each arm's run lives."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from mates.config import RunConfig, SelectionMethod
from mates.data.corpus import iter_corpus
from mates.errors import ConfigError
from mates.selection import target_label_mask

AA_ARM = "random-aa"


def arm_config(cfg: RunConfig, arm: str, seed: int) -> RunConfig:
    """The run config of one arm at one seed: the same everything, its own selection."""
    c = cfg.model_copy(deep=True)
    c.seed = seed
    c.name = f"{cfg.name}-s{seed}-{arm}"[:64]
    c.tracking.group = cfg.tracking.group or cfg.name  # the arms overlay on one chart
    sel = c.selection
    if arm == "mates":
        sel.method = (
            cfg.selection.method if cfg.selection.method in ("mates", "gumbel", "topk") else "mates"
        )
    elif arm == AA_ARM:
        sel.method, sel.seed = "random", seed + cfg.compare.aa_seed_offset
    else:
        sel.method = cast(SelectionMethod, arm)  # an arm name is a method (validated on assignment)
    if arm == "label":
        sel.target_labels = list(cfg.compare.target_labels or cfg.selection.target_labels)
    return c


def check_arms(cfg: RunConfig) -> None:
    """Refuse what cannot run, before any training starts."""
    arms = cfg.compare.arms
    if "label" in arms:
        d = cfg.data
        targets = cfg.compare.target_labels or cfg.selection.target_labels
        labels = (
            []
            if not targets or not d.domain_field
            else [
                r.domain
                for r in iter_corpus(
                    d.pool,
                    id_field=d.id_field,
                    text_field=d.text_field,
                    domain_field=d.domain_field,
                    on_bad_row=d.on_bad_row,
                )
            ]
        )
        target_label_mask(labels, targets, setting="`compare.target_labels`", field=d.domain_field)
    if len(arms) > 1 and "random" not in arms:
        raise ConfigError(
            f"`compare.arms` must include 'random', the baseline every arm is paired "
            f"with, got {arms}"
        )


def arm_dir(out_dir: Path, seed: int, arm: str) -> Path:
    return Path(out_dir) / f"seed-{seed}" / arm


def seeds_of(cfg: RunConfig) -> list[int]:
    return [cfg.seed + i for i in range(cfg.compare.seeds)]
