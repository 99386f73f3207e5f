"""`mates loadtest` (`python -m services.loadtest`): its options, the whole test against a
scorer (warm-up, then the measured phase), and the run against a scorer started here."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path

import httpx

from services.loadtest.load import Workload, _drive, _sample_rss, rss_mib
from services.loadtest.report import _report, format_report
from services.loadtest.scorer import local_scorer, prepare_model

DESCRIPTION = "Load test of the scorer: N concurrent clients POST /v1/score for a bounded time."


async def run_load(args, texts: list[str], pid: int | None) -> dict:
    """The whole test against `args.url`: warm-up, then the measured phase; the report."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, limits=limits, timeout=args.timeout_s
    ) as client:
        work = Workload(args.model, texts, args.docs_per_request)
        warm, warm_s = await _drive(client, work, args.clients, args.warmup_s, args.max_requests, 1)
        samples: list[tuple[float, float]] = []
        load_start = os.getloadavg()
        sampler = asyncio.create_task(_sample_rss(pid, args.rss_every_s, samples)) if pid else None
        await asyncio.sleep(0)  # the first sample comes before the first measured request
        phase, wall_s = await _drive(client, work, args.clients, args.seconds, args.max_requests, 2)
        if sampler and pid:  # a sampler runs only with a pid
            sampler.cancel()
            end = rss_mib(pid)
            if end is not None:
                samples.append((round(wall_s, 1), round(end, 1)))
    return _report(args, pid, warm, warm_s, phase, wall_s, samples, load_start)


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise SystemExit(
            f"--docs {path} does not exist (build it: mates data build-demo --out data/demo)"
        )
    with path.open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh if line.strip()]
    if not texts:
        raise SystemExit(f"--docs {path} holds no documents")
    return texts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mates loadtest", description=DESCRIPTION)
    p.add_argument("--url", help="an existing scorer (default: start one on loopback)")
    p.add_argument("--model", help="`<run_id>/<stage>` or `<run_id>/latest` (needed with --url)")
    p.add_argument("--pid", type=int, help="the scorer's PID, to sample its RSS (with --url)")
    p.add_argument("--run-dir", type=Path, help="serve this run's models (default: prepare one)")
    p.add_argument(
        "--config",
        type=Path,
        default=Path("configs/tiny.yaml"),
        help="the prepared model uses this config's influence encoder (default: %(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("MATES_API_KEY"),
        help="bearer key (default: MATES_API_KEY; a fresh one for a scorer started here)",
    )
    p.add_argument(
        "--clients", type=int, default=20, help="concurrent clients (default: %(default)s)"
    )
    p.add_argument(
        "--seconds", type=float, default=30.0, help="measured time (default: %(default)s)"
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=100_000,
        help="at most this many measured requests (default: %(default)s)",
    )
    p.add_argument(
        "--warmup-s", type=float, default=5.0, help="unmeasured warm-up (default: %(default)s)"
    )
    p.add_argument(
        "--docs-per-request",
        type=int,
        default=8,
        help="documents per request (default: %(default)s)",
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=Path("data/demo/pool.jsonl"),
        help="JSONL with a `text` field; requests draw from it (default: %(default)s)",
    )
    p.add_argument(
        "--timeout-s", type=float, default=60.0, help="per request (default: %(default)s)"
    )
    p.add_argument(
        "--rss-every-s", type=float, default=1.0, help="RSS sampling period (default: %(default)s)"
    )
    p.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=50.0,
        help="fail if the scorer's RSS grows more (default: %(default)s)",
    )
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    for name in ("clients", "max_requests", "docs_per_request"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seconds <= 0 or args.rss_every_s <= 0:
        p.error("--seconds and --rss-every-s must be > 0")
    if args.url and not args.model:
        p.error("--url needs --model")
    return args


def _run_local(args, texts: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="mates-loadtest-") as tmp:
        workdir = Path(tmp)
        if args.run_dir:
            from mates.artifacts import RunPaths, read_json

            artifacts = args.run_dir.resolve().parent
            args.model = (
                args.model or f"{read_json(RunPaths(args.run_dir).manifest)['run_id']}/latest"
            )
        else:
            artifacts = workdir / "artifacts"
            model = prepare_model(args.config, artifacts)
            args.model = args.model or model
        args.api_key = args.api_key or secrets.token_urlsafe(24)
        with local_scorer(artifacts, args.api_key, workdir) as (url, pid):
            args.url = url
            return asyncio.run(run_load(args, texts, pid))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    args = parse_args(argv)
    texts = read_texts(args.docs)
    if args.url:
        report = asyncio.run(run_load(args, texts, args.pid))
    else:
        report = _run_local(args, texts)
    sys.stdout.write(format_report(report))  # the report is this tool's output
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["passed"] else 1
