"""What one arm of a comparison lends another: the prepared data (tokenizer, tokenized
corpus), stage 0 (same seed and settings: identical by construction), and stage 0's
probes and influence model (the same computation on the same checkpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mates.artifacts import RunPaths, atomic_path, read_json, read_jsonl, write_json, write_jsonl
from mates.config import config_from_dict
from mates.context import Context
from mates.errors import ConfigError
from mates.manifest import StageState

STAGE0_SECTIONS = ("seed", "data", "model", "train", "stages")


def copy_prepared(ctx: Context, other: Path) -> None:
    """Take the trained tokenizer and the tokenized corpus of a run on the same data (both
    are deterministic functions of the data settings), instead of building them again."""
    src = RunPaths(other)
    theirs = config_from_dict(read_json(src.manifest)["config"])
    if theirs.fingerprint("data") != ctx.cfg.fingerprint("data"):
        return
    for path, mine, marker in (
        (src.tokenizer, ctx.paths.tokenizer, "tokenizer.json"),
        (src.tokenized, ctx.paths.tokenized, "meta.json"),
    ):
        if (path / marker).is_file() and not mine.exists():
            with atomic_path(mine) as tmp:
                shutil.copytree(path, tmp)


def copy_stage0(ctx: Context, other: Path) -> None:
    """Reuse another arm's stage 0 (random data, same seed and settings: identical by construction)."""
    paths, manifest = ctx.paths, ctx.manifest
    if (
        manifest.stage(0)["state"] == StageState.DONE
        or (paths.checkpoint(0) / "trainer.json").is_file()
    ):
        return
    src = RunPaths(other)
    theirs = config_from_dict(read_json(src.manifest)["config"])
    if theirs.fingerprint(*STAGE0_SECTIONS) != ctx.cfg.fingerprint(*STAGE0_SECTIONS):
        raise ConfigError(
            f"cannot share stage 0 with {other}: its data/model/train/stages/seed differ"
        )
    for path in (
        src.pool(0),
        src.selection(0),
        src.cooldown(0),
        src.checkpoint(0),
    ):  # the checkpoint last
        if path == src.cooldown(0) and not path.is_file():
            continue
        with atomic_path(paths.stage(0) / path.name) as tmp:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp)
    write_jsonl(paths.metrics, [r for r in read_jsonl(src.metrics) if r["stage"] == 0])
    theirs_stage0 = read_json(src.manifest)["stages"][0]
    for name in ("training", "cooldown_eval"):
        if name in theirs_stage0["timings"]:
            manifest.stage(0)["timings"][name] = theirs_stage0["timings"][name]
    flops = {
        k: v
        for k, v in (theirs_stage0["metrics"].get("flops") or {}).items()
        if k in ("train", "cooldown_eval")
    }
    manifest.update_metrics(
        0,
        **{
            k: v
            for k, v in theirs_stage0["metrics"].items()
            if k not in ("probes", "influence_model", "scores", "flops", "encoder_flops_per_doc")
        },
        flops=flops,
        shared_from=str(other),
    )


def copy_stage0_probes(ctx: Context, other: Path) -> None:
    """Take stage 0's probes and influence model from another model-based arm of the same
    seed: both probe the shared stage-0 checkpoint with the same documents of the same
    stage-1 pool, so the work would repeat bit for bit. Its metrics, FLOPs and wall
    seconds are copied too, so this arm's ledger still charges them."""
    p, src, manifest = ctx.paths, RunPaths(other), ctx.manifest
    if (
        not ctx.cfg.selection.model_based
        or p.probes(0).is_file()
        or manifest.moved_past(0, StageState.FITTING)
    ):
        return
    theirs = config_from_dict(read_json(src.manifest)["config"])
    same = (*STAGE0_SECTIONS, "probing", "influence")
    if (
        theirs.fingerprint(*same) != ctx.cfg.fingerprint(*same)
        or not theirs.selection.model_based
        or not (src.influence_model(0) / "meta.json").is_file()
    ):
        return
    stage0 = read_json(src.manifest)["stages"][0]
    with atomic_path(p.influence_model(0)) as tmp:
        shutil.copytree(src.influence_model(0), tmp)
        meta = read_json(tmp / "meta.json")  # this run's version of the same model
        meta.update(
            copied_from=meta.get("version"), run_id=manifest.run_id, version=f"{manifest.run_id}/0"
        )
        write_json(tmp / "meta.json", meta)
    with atomic_path(p.probes(0)) as tmp:  # last: its presence skips the probing
        shutil.copy2(src.probes(0), tmp)
    metrics = stage0["metrics"]
    flops = dict(manifest.stage(0)["metrics"].get("flops") or {})
    flops.update({k: v for k, v in (metrics.get("flops") or {}).items() if k in ("probe", "fit")})
    manifest.update_metrics(
        0,
        flops=flops,
        probes_shared_from=str(other),
        **{
            k: metrics[k]
            for k in ("probes", "influence_model", "encoder_flops_per_doc")
            if k in metrics
        },
    )
    for name in ("probing", "fitting"):
        if name in stage0["timings"]:
            manifest.add_timing(0, name, stage0["timings"][name])
