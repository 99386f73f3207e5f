"""The bench's driver: the sections in order, the selection overhead of a tiny run, and the
table and flat figures it prints."""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from mates.bench.common import FULL, QUICK, demo_run
from mates.bench.probes import bench_probes
from mates.bench.scoring import bench_scorer, matmul_gflops
from mates.bench.training import bench_preset, bench_trainer
from mates.config import PRESETS, load_config
from mates.run import Run, resolve_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- overhead


def _built(run: Run | None) -> Run:
    """The demo run the probe, scorer and trainer sections share (built when one is asked)."""
    assert run is not None
    return run


def bench_overhead(work: Path, device: str, progress: bool) -> dict[str, Any]:
    from mates.data.demo import build_demo

    base = work / "tiny"
    build_demo(base / "data" / "demo", seed=0, pool_news_articles=100, progress=False)
    cfg = load_config(PRESETS / "tiny.yaml", [f"device={device}"], base_dir=base)
    m = Run(cfg, base / "run", progress=progress).execute().data
    keys = ("probing", "fitting", "scoring", "selecting")  # timings, by phase
    train = sum(st["timings"].get("training", 0.0) for st in m["stages"])
    parts = {k: sum(st["timings"].get(k, 0.0) for st in m["stages"]) for k in keys}
    return {
        "config": "configs/tiny.yaml",
        "probing_method": cfg.probing.method,
        "training_s": train,
        **{f"{k}_s": v for k, v in parts.items()},
        "selection_fraction": sum(parts.values()) / train,
    }


# --------------------------------------------------------------------------- driver


def run_bench(
    quick: bool,
    device: str = "cpu",
    progress: bool = False,
    sections: tuple[str, ...] = ("probe", "scorer", "trainer", "overhead"),
    reference: str = "demo",
    presets: tuple[Path, ...] = (),
    preset_steps: int = 5,
    peak: float | None = None,
) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    dev = resolve_device(device)
    out: dict[str, Any] = {
        "device": str(dev),
        "quick": quick,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
            "matmul_gflops": matmul_gflops(dev),
        },
    }
    work = Path(tempfile.mkdtemp(prefix="mates-bench-"))
    try:
        run = (
            demo_run(work, sizes, device, progress, reference)
            if set(sections) - {"overhead", "presets"}
            else None
        )
        for name, fn in (
            ("probe", lambda: bench_probes(_built(run), sizes, work)),
            ("scorer", lambda: bench_scorer(_built(run), sizes)),
            ("trainer", lambda: bench_trainer(_built(run), sizes)),
            ("overhead", lambda: bench_overhead(work, device, progress)),
        ):
            if name in sections:
                t0 = time.perf_counter()
                out[name] = fn()
                out[name]["bench_seconds"] = round(time.perf_counter() - t0, 1)
                log.info("bench %s done in %.0fs", name, out[name]["bench_seconds"])
        if "presets" in sections:
            out["presets"] = [bench_preset(Path(c), device, preset_steps, peak) for c in presets]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def flat(result: dict[str, Any]) -> dict[str, Any]:
    """`probe.exact_per_s`-style keys (what `--json` writes, besides the nested form)."""
    keys: dict[str, Any] = {"device": result["device"]}
    for section in ("probe", "scorer", "trainer", "overhead"):
        for k, v in result.get(section, {}).items():
            if isinstance(v, dict):
                keys.update({f"{section}.{k}.{k2}": v2 for k2, v2 in v.items()})
            else:
                keys[f"{section}.{k}"] = v
    for p in result.get("presets", []):
        for k, v in p.items():
            keys[f"presets.{p['name']}.{k}"] = v
    return keys


def table(result: dict[str, Any]) -> str:
    """The printed table."""
    rows = []
    p = result.get("probe")
    if p:
        rows += [
            (
                "probe",
                f"exact, reload per probe (ref {p['reference_size']})",
                f"{p['exact_reload_per_s']:.2f} probes/s",
                "baseline",
            ),
            (
                "probe",
                "exact, in-memory snapshot",
                f"{p['exact_per_s']:.2f} probes/s",
                f"{p['exact_speedup_over_reload']:.1f}x reload",
            ),
            (
                "probe",
                "first-order",
                f"{p['first_order_per_s']:.2f} probes/s",
                f"{p['first_order_speedup']:.1f}x exact; Spearman {p['first_order_spearman']:.3f}",
            ),
        ]
    s = result.get("scorer")
    if s:
        for docs, label in ((s, "mixed lengths"), (s.get("at_cap"), "whole docs")):
            if not docs:
                continue
            rows += [
                (
                    "scorer",
                    f"naive ({s['docs']} docs, {s['encoder']}, {label}: "
                    f"{docs['tokens_mean']:.0f} tokens mean, {docs['at_window']:.0%} fill "
                    f"{s['max_tokens']})",
                    f"{docs['naive_docs_per_s']:.1f} docs/s",
                    "baseline",
                ),
                (
                    "scorer",
                    f"bucketed, pre-tokenized ({s['precision']})",
                    f"{docs['docs_per_s']:.1f} docs/s",
                    f"{docs['speedup']:.1f}x; max |diff| {docs['max_abs_diff']:.2e}",
                ),
                (
                    "scorer",
                    "the same, compiled (MATES_SCORER_COMPILE=1)",
                    f"{docs['compiled_docs_per_s']:.1f} docs/s",
                    f"{docs['compiled_speedup']:.1f}x; max |diff| {docs['compiled_max_abs_diff']:.2e}"
                    + (f"; compile {s['compile_s']:.0f}s once" if docs is s else ""),
                ),
            ]
    t = result.get("trainer")
    if t:
        rows += [
            (
                "trainer",
                f"naive ({t['batch']}, fp32)",
                f"{t['naive_tokens_per_s']:.0f} tokens/s",
                "baseline",
            ),
            (
                "trainer",
                f"Trainer ({t['precision']})",
                f"{t['tokens_per_s']:.0f} tokens/s",
                f"{t['speedup']:.1f}x",
            ),
        ]
    o = result.get("overhead")
    if o:
        rows.append(
            (
                "overhead",
                f"tiny run ({o['probing_method']} probes)",
                f"{o['selection_fraction']:.1%} of training time",
                f"train {o['training_s']:.1f}s, select {o['training_s'] * o['selection_fraction']:.1f}s",
            )
        )
    for p in result.get("presets", []):
        mfu = (
            "MFU n/a (no peak known)"
            if p["mfu"] is None
            else f"MFU {p['mfu']:.1%} of {p['peak_tflops']:g} TFLOP/s"
        )
        rows.append(
            (
                "preset",
                f"{p['name']} ({p['parameters'] / 1e6:.1f}M, {p['batch']}, {p['precision']})",
                f"{p['tokens_per_s']:.0f} tokens/s",
                f"{p['achieved_tflops']:.1f} TFLOP/s; {mfu}",
            )
        )
    w = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    m = result["machine"]
    head = f"device {result['device']} ({m['cpu']}), {m['threads']} threads, {result['date']}"
    if m.get("matmul_gflops"):
        head += (
            f"; matmul fp32 {m['matmul_gflops']['fp32']:.0f}, "
            f"bf16 {m['matmul_gflops']['bf16']:.0f} GFLOP/s"
        )
    lines = [head] + ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)
