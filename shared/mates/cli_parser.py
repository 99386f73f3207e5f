"""The options of the `mates` command line: the parser of the library's own commands (the
handlers, and the commands other packages register, are `mates.cli`'s)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML run config (see configs/)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<name>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set selection.method=random (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def library_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser of the library's own commands, and its subparsers (where `mates.cli`
    adds the commands other packages register)."""
    ap = argparse.ArgumentParser(
        prog="mates", description="Model-aware pretraining data selection."
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets").add_subparsers(
        dest="data_command", required=True
    )
    demo = data.add_parser("build-demo", help="build the demo pool, reference and held-out sets")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="one staged MATES run (resumes when --out holds it)")
    add_config_args(run)
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")

    bench = sub.add_parser("bench", help="each optimized path against the straightforward way")
    bench.add_argument(
        "--quick", action="store_true", help="smaller inputs (about 5 min on 2 CPU cores)"
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--json", type=Path, default=None, help="also write the figures here")
    bench.add_argument(
        "--reference",
        choices=("demo", "text"),
        default="demo",
        help="probe reference: the demo's LAMBADA-style set, or 256 full-length "
        "sequences of news text (loss on every token)",
    )
    bench.add_argument(
        "--only",
        default="probe,scorer,trainer,overhead",
        help="comma-separated sections (default: all but presets)",
    )
    bench.add_argument(
        "--preset",
        type=Path,
        action="append",
        default=[],
        metavar="CONFIG",
        help="also time the Trainer on this config's model and batch (random tokens) "
        "and report tokens/s and MFU, e.g. configs/pythia-160m.yaml (repeatable)",
    )
    bench.add_argument("--preset-steps", type=int, default=5, help="timed steps per preset")
    bench.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak bf16 TFLOP/s for MFU (default: known GPUs only)",
    )

    rep = sub.add_parser("report", help="a self-contained HTML report of a run (charts embedded)")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument(
        "--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)"
    )
    rep.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another run dir (e.g. the random arm) to overlay and report alongside",
    )

    agree = sub.add_parser(
        "probe-agreement",
        help="Spearman of first-order vs exact probes on a "
        "run's stage checkpoints, by probe lr (reads the run only)",
    )
    agree.add_argument("run_dir", type=Path)
    agree.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="comma-separated probe lrs")
    agree.add_argument("--probes", type=int, default=48, help="probe documents per stage")
    agree.add_argument(
        "--stages", default=None, help="comma-separated stages (default: all probeable)"
    )
    agree.add_argument("--json", type=Path, default=None, help="also write the rows here")

    ts = sub.add_parser(
        "train-stage",
        help="train one stage of a run dir; under `torchrun "
        "--nproc-per-node N` with DDP (what the trainer service runs on N GPUs)",
    )
    ts.add_argument("run_dir", type=Path)
    ts.add_argument("stage", type=int)

    res = sub.add_parser("resume", help="resume a failed or cancelled run from its directory")
    res.add_argument("run_dir", type=Path)
    res.add_argument("--no-progress", action="store_true")

    cmp_ = sub.add_parser(
        "compare",
        help="selection methods (arms) over seeds against random, "
        "same stage 0, pools and token budget; intervals, tokens and compute to match",
    )
    add_config_args(cmp_)
    cmp_.add_argument(
        "--arms",
        default=None,
        help="comma-separated arms (default `compare.arms`): "
        "random, mates, static, dsir, perplexity, label, random-aa",
    )
    cmp_.add_argument(
        "--seeds", type=int, default=None, help="seeds per arm (default `compare.seeds`)"
    )

    ev = sub.add_parser(
        "eval", help="lm-evaluation-harness tasks on a run's LM (final, or a stage's checkpoint)"
    )
    ev.add_argument("target", type=Path, help="a run folder, or a save_pretrained model folder")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ev.add_argument("--stage", type=int, default=None, help="evaluate stage K's checkpoint")
    ev.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    ev.add_argument(
        "--include", type=Path, action="append", default=[], help="a folder of YAML tasks"
    )
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    ev.add_argument("--out", type=Path, default=None, help="results JSON (default: <run>/eval/)")
    score = sub.add_parser("score", help="score documents with an influence model")
    score.add_argument("--model", type=Path, required=True, help="influence-model directory")
    score.add_argument("--input", type=Path, required=True, help="JSONL {id, text}")
    score.add_argument(
        "--output", type=Path, default=None, help="JSONL {id, score} (default stdout)"
    )
    score.add_argument("--batch-size", type=int, default=64)

    sel = sub.add_parser("select", help="select document IDs from a scores file")
    sel.add_argument("--scores", type=Path, required=True, help="JSONL {id, score}")
    sel.add_argument("--fraction", type=float, required=True, help="fraction kept, in (0, 1]")
    sel.add_argument("--temperature", type=float, default=0.5)
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--method", choices=("gumbel", "topk", "random"), default="gumbel")

    return ap, sub
