"""Downstream evaluation with EleutherAI's lm-evaluation-harness (`mates eval`).

A run's exported LM (`final-model`, the `save_pretrained` form) or a stage's checkpoint
(exported beside it on first use) is evaluated through lm-eval's Python API
(`simple_evaluate`), and the results are written beside the run:
`<run>/eval/final.json` or `<run>/eval/stage-<k>.json`.

Tasks are lm-eval's by name (their data must be available locally: nothing is downloaded
here), YAML tasks in folders given with `include`, and one task built from the run's own
data, `mates_heldout_cloze`: multiple choice over each cloze held-out example, the true
continuation against three others' continuations (seeded), scored by log-likelihood.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

from mates.artifacts import RunPaths, atomic_path, read_json, write_json
from mates.config import RunConfig
from mates.errors import ConfigError, MatesError

log = logging.getLogger(__name__)

HELDOUT_TASK = "mates_heldout_cloze"
DISTRACTORS = 3
WEIGHTS = "model.safetensors"
EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class EvalError(MatesError):
    """An evaluation that cannot run: an unknown task, a task without its data."""


def model_dir(target: Path, stage: int | None) -> tuple[Path, Path | None]:
    """(the model to evaluate, the run it belongs to or None) for a run or model folder."""
    paths = RunPaths(target)
    if paths.manifest.is_file():
        final = paths.export()
        if stage is None:
            if not (final / "config.json").is_file():
                raise ConfigError(f"{target}: the run has no final-model yet (is it done?)")
            return final, target
        return export_stage(paths, stage), target
    if stage is not None:
        raise ConfigError(f"--stage needs a run folder; {target} is not one")
    if not (target / "config.json").is_file():
        raise ConfigError(f"{target} is neither a run folder nor a save_pretrained model")
    return target, None


def export_stage(paths: RunPaths, k: int) -> Path:
    """Stage k's checkpoint in `save_pretrained` form (its weights, the final model's
    config and tokenizer), written once under `<run>/eval/models/stage-<k>`."""
    out = paths.eval_model(k)
    if (out / WEIGHTS).is_file():
        return out
    weights = paths.checkpoint(k) / WEIGHTS
    final = paths.export()
    if not weights.is_file():
        raise ConfigError(f"stage {k} has no checkpoint at {weights.parent}")
    if not (final / "config.json").is_file():
        raise ConfigError(
            f"{paths.root}: a stage is exported with the final model's config; the run is not done"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name in EXPORT_FILES:
            if (final / name).is_file():
                shutil.copy2(final / name, tmp / name)
        shutil.copy2(weights, tmp / WEIGHTS)
    return out


def heldout_task(cfg: RunConfig, folder: Path, seed: int = 0) -> Path:
    """Write `mates_heldout_cloze` (YAML and data) for the run's cloze held-out sets."""
    from mates.data.reference import read_cloze_pairs

    rows: list[dict[str, str]] = []
    for spec in cfg.data.heldout_specs():
        if spec.kind == "cloze":
            rows.extend({"context": c, "continuation": t} for c, t in read_cloze_pairs(spec.path))
    if len(rows) < DISTRACTORS + 1:
        raise EvalError(
            f"{HELDOUT_TASK} needs at least {DISTRACTORS + 1} cloze held-out examples "
            f"(`data.heldout` of kind cloze); the run has {len(rows)}"
        )
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{HELDOUT_TASK}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            others = [
                r["continuation"]
                for j, r in enumerate(rows)
                if j != i and r["continuation"] != row["continuation"]
            ]
            choices = [row["continuation"], *rng.sample(others, DISTRACTORS)]
            rng.shuffle(choices)
            doc = {
                "context": row["context"],
                "choices": choices,
                "label": choices.index(row["continuation"]),
            }
            fh.write(json.dumps(doc) + "\n")
    (folder / f"{HELDOUT_TASK}.yaml").write_text(
        f"task: {HELDOUT_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def evaluate(
    target: Path,
    tasks: list[str],
    *,
    stage: int | None = None,
    limit: int | None = None,
    include: list[Path] = (),  # type: ignore[assignment]
    batch_size: int = 8,
    device: str = "cpu",
    out: Path | None = None,
) -> dict[str, Any]:
    """Run lm-eval's `tasks` on a run's (or a model folder's) LM; write and return
    `{"model", "stage", "limit", "tasks": {task: {metric: value}}}`."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("`mates eval` needs lm-eval (pip install 'mates[eval]')") from None
    if not tasks:
        raise ConfigError("--tasks names no task")
    model, run = model_dir(Path(target), stage)
    paths = [Path(p) for p in include]
    if HELDOUT_TASK in tasks:
        if run is None:
            raise ConfigError(
                f"{HELDOUT_TASK} is built from a run's held-out data: give a run folder"
            )
        cfg = RunConfig.model_validate(read_json(RunPaths(run).manifest)["config"])
        paths.append(heldout_task(cfg, RunPaths(run).eval_dir() / "tasks"))
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(
            f"unknown lm-eval task(s) {unknown}: not lm-eval's, nor in {[str(p) for p in paths]}"
        )
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never a download at run time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        raw = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model},dtype=float32",
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            batch_size=batch_size,
            device=device,
        )
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as e:
        raise EvalError(
            f"lm-eval could not run {tasks}: {e}. A task needs its data set available locally "
            "(nothing is downloaded): pre-fetch it into the Hugging Face cache or define the "
            "task in YAML over local files (--include)"
        ) from None
    results = {
        task: {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "sample_len"
        }
        for task, metrics in raw["results"].items()
    }
    record = {"model": str(model), "stage": stage, "limit": limit, "tasks": results}
    if out is None and run is not None:
        out = RunPaths(run).eval_results(stage)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(out), record)
    return record
