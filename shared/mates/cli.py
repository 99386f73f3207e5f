"""The `mates` command line: its commands' handlers (their options are
`mates.cli_parser`'s). This module is the only place that prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mates.cli_parser import library_parser  # noqa: E402
from mates.errors import MatesError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    ap, sub = library_parser()
    for plugin in _plugins():
        COMMANDS.update(plugin.register(sub))
    return ap


def _plugins() -> list:
    """Command sets other packages register under the `mates.commands` entry-point group
    (the services register `runs`, `serve` and `loadtest`): each a module with
    `register(subparsers) -> {command: handler}` and `RAW = {command: main(argv)}` for a
    command that parses its own arguments. The library itself imports none of them."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in entry_points(group="mates.commands")]


def _load(args) -> tuple:
    from mates.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / cfg.name
    return cfg, out


def cmd_build_demo(args) -> int:
    from mates.data.demo import build_demo

    manifest = build_demo(args.out, seed=args.seed)
    print(json.dumps({k: manifest[k] for k in manifest if k != "sources"}, indent=2))
    print(f"demo data written to {args.out}")
    return 0


def cmd_run(args) -> int:
    from mates.run import Run

    cfg, out = _load(args)
    if args.dry_run:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    m = Run(cfg, out, progress=not args.no_progress).execute()
    print_stages(m.data)
    print(f"run {m.run_id} done: {out}")
    return 0


def cmd_bench(args) -> int:
    from mates.artifacts import write_json
    from mates.bench import flat, run_bench, table

    sections = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(sections) - {"probe", "scorer", "trainer", "overhead", "presets"}
    if unknown:
        raise MatesError(
            f"--only: unknown section(s) {sorted(unknown)}; "
            "choose from probe, scorer, trainer, overhead, presets"
        )
    if args.preset:
        sections = tuple(dict.fromkeys((*sections, "presets")))
    elif "presets" in sections:
        raise MatesError("--only presets needs at least one --preset CONFIG")
    if args.preset_steps < 1:
        raise MatesError(f"--preset-steps must be at least 1, got {args.preset_steps}")
    logging.getLogger("mates").setLevel(logging.INFO)
    result = run_bench(
        args.quick,
        args.device,
        progress=False,
        sections=sections,
        reference=args.reference,
        presets=tuple(args.preset),
        preset_steps=args.preset_steps,
        peak=args.peak_tflops,
    )
    print(table(result))
    if args.json:
        write_json(args.json, {**flat(result), "nested": result})
        print(f"figures written to {args.json}")
    return 0


def cmd_report(args) -> int:
    from mates.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out, args.baseline)}")
    return 0


def _numbers(text: str, kind, option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise MatesError(f"{option}: expected comma-separated numbers, got {text!r}") from e


def cmd_probe_agreement(args) -> int:
    from mates.agreement import format_table, probe_agreement
    from mates.artifacts import write_json

    stages = None if args.stages is None else _numbers(args.stages, int, "--stages")
    rows = probe_agreement(args.run_dir, _numbers(args.lrs, float, "--lrs"), args.probes, stages)
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"run_dir": str(args.run_dir), "rows": rows})
        print(f"rows written to {args.json}")
    return 0


def cmd_train_stage(args) -> int:
    from mates.run import train_stage_process

    train_stage_process(args.run_dir, args.stage)
    return 0


def cmd_resume(args) -> int:
    from mates.run import Run

    m = Run.open(args.run_dir, progress=not args.no_progress).execute()
    print_stages(m.data)
    print(f"run {m.run_id} done: {args.run_dir}")
    return 0


def print_stages(data: Mapping[str, Any]) -> None:
    print(
        f"{'stage':>5} {'state':>9} {'tokens':>10} {'held-out':>9} {'ref':>7} {'val rho':>7} {'seconds':>8}"
    )
    for st in data["stages"]:
        m = st["metrics"]
        rho = (m.get("influence_model") or {}).get("val_spearman")
        secs = sum(st["timings"].values())
        print(
            f"{st['stage']:>5} {st['state']:>9} {m.get('tokens', 0):>10} "
            f"{_number(m.get('heldout_loss'), 4):>9} {_number(m.get('reference_loss'), 4):>7} "
            f"{_number(rho, 3):>7} {secs:>8.1f}"
        )


def _number(value: float | None, digits: int) -> str:
    """A metric for a table, or '-' before it has been measured (never 'nan')."""
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}"


def cmd_compare(args) -> int:
    from mates.compare import compare, format_table

    if args.arms is not None:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        args.overrides.append(f"compare.arms=[{','.join(arms)}]")
    if args.seeds is not None:
        args.overrides.append(f"compare.seeds={args.seeds}")
    cfg, out = _load(args)
    s = compare(cfg, out, progress=not args.no_progress)
    print()
    print(format_table(s))
    print(f"wrote {out / 'comparison.json'}, {out / 'comparison.png'} and {out / 'report.html'}")
    return 0


def cmd_score(args) -> int:
    import torch

    from mates.data.corpus import iter_corpus
    from mates.influence import InfluenceScorer

    rows = list(iter_corpus(args.input, domain_field=None))
    scorer = InfluenceScorer.load(
        args.model, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    scores = scorer.score_texts([r.text for r in rows], args.batch_size)
    out = [{"id": r.id, "score": float(s)} for r, s in zip(rows, scores, strict=True)]
    if args.output:
        from mates.artifacts import write_jsonl

        write_jsonl(args.output, out)
    else:
        print("\n".join(json.dumps(row) for row in out))
    return 0


def _read_scores(path: Path) -> list[dict]:
    """The rows of a scores file, each checked as it is read so that an error names
    `file:line` (non-UTF-8, not JSON, not `{id, score}`, a repeated ID)."""
    from mates.artifacts import iter_jsonl
    from mates.errors import DataError
    from mates.selection import join_scores

    if not path.is_file():
        raise DataError(f"scores file {path} does not exist")
    rows: list[dict] = []
    first_line: dict[str, int] = {}
    for lineno, row, bad in iter_jsonl(path):
        if bad:
            raise DataError(f"{path}:{lineno}: {bad}")
        try:  # the library's check of one row
            join_scores([row.get("id") if isinstance(row, dict) else None], [row])
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        doc_id: str = row["id"]
        if doc_id in first_line:
            raise DataError(
                f"{path}:{lineno}: duplicate score for id {doc_id!r} "
                f"(first on line {first_line[doc_id]})"
            )
        first_line[doc_id] = lineno
        rows.append(row)
    return rows


def cmd_select(args) -> int:
    from mates.selection import select_ids

    if not 0 < args.fraction <= 1:
        raise MatesError(f"--fraction must be in (0, 1], got {args.fraction}")
    from mates.errors import DataError

    rows = _read_scores(args.scores)
    try:
        ids = select_ids(
            rows,
            fraction=args.fraction,
            method=args.method,
            temperature=args.temperature,
            seed=args.seed,
        )
    except DataError as e:
        raise DataError(f"{args.scores}: {e}") from None
    print("\n".join(json.dumps(i) for i in ids))
    return 0


def cmd_eval(args) -> int:
    from mates.downstream import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    record = evaluate(
        args.target,
        tasks,
        stage=args.stage,
        limit=args.limit,
        include=args.include,
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
    )
    for task, metrics in record["tasks"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        print(f"{task}: {shown}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "bench": cmd_bench,
    "train-stage": cmd_train_stage,
    "probe-agreement": cmd_probe_agreement,
    "report": cmd_report,
    "resume": cmd_resume,
    "compare": cmd_compare,
    "score": cmd_score,
    "eval": cmd_eval,
    "select": cmd_select,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for plugin in _plugins():
        raw = getattr(plugin, "RAW", {})
        if argv[:1] and argv[0] in raw:  # a command whose options are its own
            return raw[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars report progress; HF's "Writing shards" is noise
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler = cmd_build_demo if args.command == "data" else COMMANDS[args.command]
    try:
        return handler(args)
    except MatesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
