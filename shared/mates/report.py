"""What a run looks like: its curves, stage timeline, influences and selections.

`run_view(run_dir)` gathers everything a person judges a run by into plain data (the
dashboard serves it as JSON too); `charts(view)` draws it as inline SVG with
matplotlib; `render_html` lays both out as one self-contained page, which
`mates report` writes and the API's dashboard serves.
"""

from __future__ import annotations

import html
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from mates.artifacts import RunPaths, atomic_path, read_json, read_jsonl
from mates.errors import ArtifactError

PHASES = ("training", "probing", "fitting", "scoring", "selecting")
PHASE_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756")


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _selection_ids(paths: RunPaths, k: int) -> set[str] | None:
    path = paths.selection(k)
    return set(read_json(path)["ids"]) if path.is_file() else None


def _domain_shift(sel: dict) -> dict[str, dict[str, float]]:
    """Share of each domain in the selection and in the pool it was drawn from."""
    chosen, pool = sel.get("domains") or {}, sel.get("pool_domains") or {}
    if not pool or set(pool) == {"-"}:
        return {}  # the corpus has no domain field
    n_sel, n_pool = max(sum(chosen.values()), 1), max(sum(pool.values()), 1)
    return {d: {"selected": chosen.get(d, 0) / n_sel, "pool": pool[d] / n_pool} for d in sorted(pool)}


def run_view(run_dir: Path) -> dict[str, Any]:
    """A run's state, curves and per-stage statistics, read from its directory."""
    paths = RunPaths(Path(run_dir))
    if not paths.manifest.is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no run.json)")
    m = read_json(paths.manifest)
    end = m["updated_at"] if m["status"] in ("done", "failed", "cancelled") else time.time()
    stages, previous = [], None
    for st in m["stages"]:
        k = st["stage"]
        met = st.get("metrics") or {}
        sel_ids = _selection_ids(paths, k)
        overlap = None
        if sel_ids and previous:
            overlap = len(sel_ids & previous) / len(sel_ids)
        previous = sel_ids
        probes = met.get("probes") or {}
        stages.append({
            "stage": k, "state": st["state"],
            "seconds": {p: st.get("timings", {}).get(p) for p in PHASES},
            "heldout_loss": met.get("heldout_loss"), "reference_loss": met.get("reference_loss"),
            "tokens": met.get("tokens"),
            "probe_method": probes.get("method"), "probe_count": probes.get("count"),
            "first_order_spearman": probes.get("first_order_spearman"),
            "val_spearman": (met.get("influence_model") or {}).get("val_spearman"),
            "selected": (met.get("selection") or {}).get("selected"),
            "selection_method": (met.get("selection") or {}).get("method"),
            "overlap_with_previous": overlap,
            "domain_shift": _domain_shift(met.get("selection") or {}),
            "influences": [r["influence"] for r in _rows(paths.probes(k))],
            "scores": [r["score"] for r in _rows(paths.scores(k))],
            "error": st.get("error"),
        })
    return {
        "run_id": m["run_id"], "name": m["name"], "status": m["status"],
        "current_stage": m.get("current_stage"), "error": m.get("error"),
        "created_at": m["created_at"], "elapsed_s": max(0.0, end - m["created_at"]),
        "curve": [{k: r.get(k) for k in ("stage", "step", "tokens", "heldout_loss", "reference_loss")}
                  for r in _rows(paths.metrics)],
        "stages": stages,
    }


# --------------------------------------------------------------------------- charts


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prologue so the SVG can sit inline


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h), dpi=100)


def loss_chart(view: dict, baseline: dict | None = None) -> str:
    fig, ax = _figure(7.5, 3.6)
    pts = [r for r in view["curve"] if r.get("heldout_loss") is not None]
    x = [r["tokens"] / 1e6 for r in pts]
    ax.plot(x, [r["heldout_loss"] for r in pts], "-o", ms=3, color="#4c78a8", label="held-out")
    ref = [(t, r["reference_loss"]) for t, r in zip(x, pts, strict=True) if r.get("reference_loss") is not None]
    if ref:
        ax.plot(*zip(*ref, strict=True), "-", color="#f58518", alpha=0.8, label="reference")
    if baseline:
        bp = [r for r in baseline["curve"] if r.get("heldout_loss") is not None]
        ax.plot([r["tokens"] / 1e6 for r in bp], [r["heldout_loss"] for r in bp], "--",
                color="#7f7f7f", label=f"held-out, {baseline['name']}")
    for st in view["stages"][1:]:  # stage boundaries
        first = next((r for r in pts if r["stage"] == st["stage"]), None)
        if first:
            ax.axvline(first["tokens"] / 1e6, color="#bbbbbb", lw=0.8, ls=":")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    return _svg(fig)


def timeline_chart(view: dict) -> str:
    stages = view["stages"]
    fig, ax = _figure(7.5, 0.5 + 0.42 * len(stages))
    for i, st in enumerate(stages):
        left = 0.0
        for phase, color in zip(PHASES, PHASE_COLORS, strict=True):
            sec = st["seconds"].get(phase) or 0.0
            ax.barh(i, sec, left=left, color=color, label=phase if i == 0 else None)
            left += sec
    ax.set_yticks(range(len(stages)), [f"stage {s['stage']} ({s['state']})" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, ncol=5, loc="lower right")
    return _svg(fig)


def distribution_chart(stage: dict) -> str | None:
    """Histograms of the oracle influences and of the predicted scores of one stage."""
    if not stage["influences"] and not stage["scores"]:
        return None
    fig, axes = _figure(7.5, 2.4)
    fig.clf()
    for j, (key, label, color) in enumerate((("influences", "oracle influence (probes)", "#f58518"),
                                             ("scores", "predicted score (pool, z-units)", "#4c78a8"))):
        ax = fig.add_subplot(1, 2, j + 1)
        vals = np.asarray(stage[key], dtype=float)
        if len(vals):
            ax.hist(vals, bins=min(30, max(5, len(vals) // 4)), color=color)
        ax.set_title(f"{label}, n={len(vals)}", fontsize=9)
        ax.locator_params(axis="x", nbins=5)
        ax.tick_params(labelsize=7)
    return _svg(fig)


def domain_chart(stage: dict) -> str | None:
    """Each domain's share of the stage's selection minus its share of the pool it came from."""
    shift = stage["domain_shift"]
    if not shift:
        return None
    doms = list(shift)
    diff = [100 * (shift[d]["selected"] - shift[d]["pool"]) for d in doms]
    fig, ax = _figure(7.5, 0.6 + 0.22 * len(doms))
    ax.barh(doms, diff, color=["#54a24b" if v >= 0 else "#e45756" for v in diff])
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.tick_params(labelsize=7)
    ax.set_xlabel("share in selection − share in pool (percentage points)")
    return _svg(fig)


def charts(view: dict, baseline: dict | None = None) -> dict[str, str]:
    out = {"loss": loss_chart(view, baseline), "timeline": timeline_chart(view)}
    for st in view["stages"]:
        for name, fn in (("distribution", distribution_chart), ("domains", domain_chart)):
            svg = fn(st)
            if svg:
                out[f"{name}-{st['stage']}"] = svg
    return out


# --------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.chart svg { max-width: 100%; height: auto; }
.state-done { color: #2a7d2a; } .state-failed { color: #b00020; } .state-cancelled { color: #8a6d00; }
.muted { color: #777; font-size: 0.85rem; }
"""


def elapsed_text(seconds: float) -> str:
    """A duration as people read it: `42 s`, `3.5 min`, `2.1 h`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else html.escape(str(v))


def stage_table(view: dict) -> str:
    head = ["stage", "state", *PHASES, "held-out loss", "probes", "val Spearman",
            "first-order Spearman", "selected", "overlap with previous"]
    rows = []
    for st in view["stages"]:
        state = html.escape(str(st["state"]))
        cells = [str(st["stage"]), f'<span class="state-{state}">{state}</span>',
                 *[_fmt(st["seconds"][p], ".1f") for p in PHASES], _fmt(st["heldout_loss"]),
                 _fmt(st["probe_count"], "d"), _fmt(st["val_spearman"], ".2f"),
                 _fmt(st["first_order_spearman"], ".3f"), _fmt(st["selected"], "d"),
                 _fmt(st["overlap_with_previous"], ".0%")]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


def run_body(view: dict, svgs: dict[str, str]) -> str:
    """The run's section: summary, stage table, and its charts (no <html> wrapper)."""
    final = next((s["heldout_loss"] for s in reversed(view["stages"]) if s["heldout_loss"] is not None), None)
    parts = [
        f'<h2>{html.escape(view["name"])} <span class="muted">{html.escape(view["run_id"])}</span></h2>',
        f'<p>status <b class="state-{html.escape(view["status"])}">{html.escape(view["status"])}</b>, '
        f'stage {_fmt(view["current_stage"], "d")}, elapsed {elapsed_text(view["elapsed_s"])}, '
        f'latest held-out loss {_fmt(final)}</p>',
    ]
    if view.get("error"):
        parts.append(f'<p class="state-failed">error: {html.escape(str(view["error"]))}</p>')
    parts += ['<h3>Stages</h3>', stage_table(view),
              '<h3>Loss against training tokens</h3>', f'<div class="chart" id="chart-loss">{svgs["loss"]}</div>',
              '<h3>Stage timeline</h3>', f'<div class="chart" id="chart-timeline">{svgs["timeline"]}</div>']
    for st, nxt in zip(view["stages"], view["stages"][1:], strict=False):
        k, k1 = st["stage"], nxt["stage"]
        dist, dom = svgs.get(f"distribution-{k}"), svgs.get(f"domains-{k1}")
        if not dist and not dom:
            continue
        # stage k's checkpoint is probed, its influence model scores stage k+1's pool,
        # and the selection it makes is the one stage k+1 trains on
        parts.append(f"<h3>Stage {k} → {k1}: probes at stage {k}'s checkpoint, "
                     f"stage {k1}'s pool scores and selection</h3>")
        parts.append(f"<p class=\"muted\">influence-model validation Spearman "
                     f"{_fmt(st['val_spearman'], '.2f')}; stage {k1}'s selection shares "
                     f"{_fmt(nxt['overlap_with_previous'], '.0%')} of its documents with stage {k}'s</p>")
        for name, key, svg in (("distribution", k, dist), ("domains", k1, dom)):
            if svg:
                parts.append(f'<div class="chart" id="chart-{name}-{key}">{svg}</div>')
    return "\n".join(parts)


def page(title: str, body: str, head_extra: str = "") -> str:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style>{head_extra}</head>"
            f"<body>{body}</body></html>")


def render_report(view: dict, baseline: dict | None = None) -> str:
    body = [f"<h1>MATES run report: {html.escape(view['name'])}</h1>",
            run_body(view, charts(view, baseline))]
    if baseline:
        body += ["<hr>", "<h1>Baseline arm</h1>", run_body(baseline, charts(baseline))]
    body.append(f'<p class="muted">written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} '
                "by mates report</p>")
    return page(f"MATES report {view['run_id']}", "\n".join(body))


def write_report(run_dir: Path, out: Path | None = None, baseline_dir: Path | None = None) -> Path:
    """Write a self-contained HTML report of a run (and a baseline arm) to `out`."""
    view = run_view(run_dir)
    baseline = run_view(baseline_dir) if baseline_dir else None
    out = Path(out) if out else Path(run_dir) / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(render_report(view, baseline), encoding="utf-8")
    return out
