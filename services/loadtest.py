"""Load test of the scorer: N concurrent clients POST /v1/score for a bounded time.

    python -m services.loadtest [--url URL --model RUN/K [--pid PID]] [--clients 20] [--seconds 30]

Without `--url` it prepares a model (an untrained head on the influence encoder of
`--config`, shaped like that run's models; or the models of `--run-dir`), starts a real
`mates serve scorer` on a free loopback port and stops it by PID at the end.
After a warm-up it measures requests/s, documents/s, latency percentiles, errors (by
status or exception, including a response without exactly one score per document in
order) and the scorer's resident memory (VmRSS of its PID) over the run. The exit
status is 1 if any request failed or memory grew more than `--max-rss-growth-mib`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from services.common.contracts import MODEL_VERSION_HEADER

log = logging.getLogger("mates.loadtest")


@dataclass
class Phase:
    """What one phase (warm-up or measured) of the load saw."""

    latencies_s: list[float] = field(default_factory=list)  # of successful requests
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    docs: int = 0
    versions: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------- the load


def check_scores(resp: httpx.Response, ids: list[str]) -> str | None:
    """Why a 200 answer is wrong, or None: one finite score per document, in request order."""
    try:
        rows = resp.json()
        got = [row["id"] for row in rows]
        scores = [float(row["score"]) for row in rows]
    except (ValueError, TypeError, KeyError):
        return "bad body: not a list of {id, score}"
    if got != ids:
        return f"bad body: {len(got)} ids for {len(ids)} documents, or out of order"
    if not all(math.isfinite(s) for s in scores):
        return "bad body: a score is not finite"
    if MODEL_VERSION_HEADER not in resp.headers:
        return f"bad body: no {MODEL_VERSION_HEADER} header"
    return None


@dataclass
class Workload:
    """What every request carries: `docs_per_request` texts drawn from `texts`, for `model`."""

    model: str
    texts: list[str]
    docs_per_request: int

    def request(self, rng: np.random.Generator, prefix: str) -> tuple[list[str], dict]:
        """(document IDs, body) of one request; IDs are unique across the whole test."""
        ids = [f"{prefix}-{j}" for j in range(self.docs_per_request)]
        picks = rng.integers(len(self.texts), size=self.docs_per_request)
        docs = [{"id": i, "text": self.texts[p]} for i, p in zip(ids, picks, strict=True)]
        return ids, {"model": self.model, "documents": docs}


async def _client(
    client: httpx.AsyncClient,
    work: Workload,
    rng: np.random.Generator,
    deadline: float,
    budget: list[int],
    tag: str,
    phase: Phase,
) -> None:
    """One client: requests back to back until the deadline or the shared budget runs out."""
    n = 0
    while time.perf_counter() < deadline and budget[0] > 0:
        budget[0] -= 1  # one event loop, so no lock
        ids, body = work.request(rng, f"{tag}-{n}")
        n += 1
        t0 = time.perf_counter()
        try:
            resp = await client.post("/v1/score", json=body)
        except httpx.HTTPError as e:
            phase.requests += 1
            phase.errors[type(e).__name__] += 1
            continue
        elapsed = time.perf_counter() - t0
        phase.requests += 1
        problem = f"HTTP {resp.status_code}" if resp.status_code != 200 else check_scores(resp, ids)
        if problem:
            phase.errors[problem] += 1
            log.debug("%s: %s", problem, resp.text[:200])
            continue
        phase.latencies_s.append(elapsed)
        phase.docs += len(ids)
        phase.versions.add(resp.headers[MODEL_VERSION_HEADER])


async def _drive(
    client: httpx.AsyncClient,
    work: Workload,
    clients: int,
    seconds: float,
    max_requests: int,
    seed: int,
) -> tuple[Phase, float]:
    """All clients at once for `seconds` (at most `max_requests`); the phase and its wall time."""
    phase, budget = Phase(), [max_requests]
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            _client(
                client, work, np.random.default_rng([seed, i]), t0 + seconds, budget, f"c{i}", phase
            )
            for i in range(clients)
        )
    )
    return phase, time.perf_counter() - t0


def rss_mib(pid: int) -> float | None:
    """Resident memory of process `pid` (VmRSS in /proc/PID/status), or None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


async def _sample_rss(pid: int, every_s: float, out: list[tuple[float, float]]) -> None:
    t0 = time.perf_counter()
    while True:
        mib = rss_mib(pid)
        if mib is not None:
            out.append((round(time.perf_counter() - t0, 1), round(mib, 1)))
        await asyncio.sleep(every_s)


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
        if sampler:
            sampler.cancel()
            end = rss_mib(pid)
            if end is not None:
                samples.append((round(wall_s, 1), round(end, 1)))
    return _report(args, pid, warm, warm_s, phase, wall_s, samples, load_start)


def _latency_ms(latencies_s: list[float]) -> dict[str, float | None]:
    ms = np.asarray(latencies_s) * 1000
    stats = {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    out = {k: round(float(np.percentile(ms, q)), 1) if len(ms) else None for k, q in stats.items()}
    return {**out, "mean": round(float(ms.mean()), 1) if len(ms) else None}


def _report(
    args,
    pid,
    warm: Phase,
    warm_s: float,
    phase: Phase,
    wall_s: float,
    samples: list[tuple[float, float]],
    load_start,
) -> dict:
    rss = None
    if samples:
        mibs = [m for _, m in samples]
        # Growth over the second half tells a leak (still climbing) from warm-up (flat by then).
        rss = {
            "pid": pid,
            "start": mibs[0],
            "end": mibs[-1],
            "max": max(mibs),
            "growth": round(mibs[-1] - mibs[0], 1),
            "growth_second_half": round(mibs[-1] - mibs[len(mibs) // 2], 1),
            "samples": samples,
        }
    problems = [] if phase.latencies_s else ["no request succeeded"]
    errors = phase.errors + warm.errors
    if errors:
        problems.append(f"{sum(errors.values())} failed requests")
    if rss and rss["growth"] > args.max_rss_growth_mib:
        problems.append(f"scorer RSS grew {rss['growth']} MiB (> {args.max_rss_growth_mib})")
    return {
        "url": args.url,
        "model": args.model,
        "versions": sorted(phase.versions),
        "clients": args.clients,
        "docs_per_request": args.docs_per_request,
        "seconds": round(wall_s, 2),
        "requests": phase.requests,
        "ok": len(phase.latencies_s),
        "requests_per_s": round(phase.requests / wall_s, 1),
        "docs_per_s": round(phase.docs / wall_s, 1),
        "latency_ms": _latency_ms(phase.latencies_s),
        "errors": dict(phase.errors),
        "warmup": {
            "seconds": round(warm_s, 2),
            "requests": warm.requests,
            "errors": dict(warm.errors),
        },
        "rss_mib": rss,
        "max_rss_growth_mib": args.max_rss_growth_mib,
        "load_average": {
            "start": [round(x, 2) for x in load_start],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "cpu_count": os.cpu_count(),
        "problems": problems,
        "passed": not problems,
    }


def _counts(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"


def format_report(r: dict) -> str:
    lat, rss = r["latency_ms"], r["rss_mib"]
    rows = [
        ("scorer", f"{r['url']}  model {r['model']} -> {', '.join(r['versions']) or '-'}"),
        (
            "load",
            f"{r['clients']} clients x {r['docs_per_request']} docs/request, {r['seconds']} s "
            f"(after {r['warmup']['seconds']} s warm-up, {r['warmup']['requests']} requests)",
        ),
        ("requests", f"{r['requests']} ({r['ok']} ok)"),
        ("requests/s", r["requests_per_s"]),
        ("docs/s", r["docs_per_s"]),
        ("latency ms", "  ".join(f"{k} {v}" for k, v in lat.items())),
        ("errors", f"{_counts(r['errors'])} (warm-up: {_counts(r['warmup']['errors'])})"),
        (
            "scorer RSS MiB",
            f"start {rss['start']}  end {rss['end']}  max {rss['max']}  "
            f"growth {rss['growth']} (second half {rss['growth_second_half']}; "
            f"{len(rss['samples'])} samples, pid {rss['pid']})"
            if rss
            else "not measured (no --pid)",
        ),
        (
            "load average",
            f"{r['load_average']['start']} -> {r['load_average']['end']} on {r['cpu_count']} CPUs",
        ),
        ("result", "PASS" if r["passed"] else "FAIL: " + "; ".join(r["problems"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


# --------------------------------------------------------------------------- a scorer of our own


def prepare_model(config: Path, root: Path) -> str:
    """A one-stage run under `root` whose model has `config`'s influence encoder and an
    untrained head: the scorer's cost per document is the fitted model's. Its `run/0`."""
    import torch
    from transformers.utils import logging as hf_logging

    from mates.artifacts import RunPaths
    from mates.config import load_config
    from mates.influence import InfluenceModel, InfluenceScorer, load_encoder
    from mates.manifest import Manifest, new_run_id

    hf_logging.disable_progress_bar()  # "Writing model shards" is noise here
    inf = load_config(config).influence
    run_id = new_run_id("loadtest")
    paths = RunPaths(root / run_id)
    Manifest.create(
        paths.manifest,
        {"name": "loadtest", "stages": {"num_stages": 1}},
        "loadtest",
        1,
        run_id=run_id,
    )
    encoder, tokenizer = load_encoder(inf.encoder, seed=0)
    scorer = InfluenceScorer(
        InfluenceModel(encoder),
        tokenizer,
        inf.max_tokens,
        torch.device("cpu"),
        precision=inf.precision,
    )
    scorer.save(paths.influence_model(0), inf.encoder, inf.train_encoder)
    return f"{run_id}/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, logfile: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"the scorer exited with {proc.returncode}:\n{logfile.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the scorer at {url} was not ready after {timeout_s:.0f} s; log: {logfile}")


@contextmanager
def local_scorer(artifacts: Path, api_key: str, workdir: Path) -> Iterator[tuple[str, int]]:
    """`mates serve scorer` on a free loopback port: (url, pid); stopped by PID on exit."""
    port = _free_port()
    env = {
        **os.environ,
        "MATES_ARTIFACTS_DIR": str(artifacts),
        "MATES_API_KEY": api_key,
        "MATES_DEV": "0",
        "MATES_SCORER_HOST": "127.0.0.1",
        "MATES_SCORER_PORT": str(port),
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    logfile = workdir / "scorer.log"
    with logfile.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mates.cli", "serve", "scorer"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, proc, logfile)
            log.info("scorer pid %d on %s (log %s)", proc.pid, url, logfile)
            yield url, proc.pid
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)


# --------------------------------------------------------------------------- command line


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
    p = argparse.ArgumentParser(prog="mates loadtest", description=__doc__.split("\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
