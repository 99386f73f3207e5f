"""The load test's report: figures of the measured phase, the scorer's memory over it, the
problems that fail the test, and the report as text."""

from __future__ import annotations

import os

import numpy as np

from services.loadtest.load import Phase


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
