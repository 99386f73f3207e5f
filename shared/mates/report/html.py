"""The run as HTML: tables, history, the body the dashboard serves and the self-contained
page `mates report` writes."""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path

from mates.artifacts import atomic_path
from mates.report.charts import as_overlays, charts
from mates.report.text import budget_text, fmt
from mates.report.views import PHASES, arm_overlays, run_view

log = logging.getLogger(__name__)


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.config td { text-align: left; }
.chart svg { max-width: 100%; height: auto; }
.state-done { color: #2a7d2a; } .state-failed { color: #b00020; } .state-cancelled { color: #8a6d00; }
.state-resumed { color: #1f5fa8; font-weight: 600; }
.warn { color: #b00020; font-size: 0.8rem; }
.sign { background: #f4f6fa; border-left: 3px solid #4c78a8; padding: .4rem .7rem; }
ol.history { font-size: 0.85rem; padding-left: 1.4rem; }
.muted { color: #777; font-size: 0.85rem; }
"""

MIN_SPEARMAN_N = 10  # fewer points than this: a Spearman is mostly noise
SIGN_TEXT = (
    "Sign convention: an influence is the change in the reference loss after one "
    "training step on the document, so <b>LOWER influence / score = MORE HELPFUL</b>; "
    "the selection keeps the lowest predicted scores."
)


def elapsed_text(seconds: float) -> str:
    """A duration as people read it: `42 s`, `3.5 min`, `2.1 h`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def spearman_text(
    rho: float | None, n: int | None, spec: str = ".2f", interval: list[float] | None = None
) -> str:
    """`0.41 [0.26, 0.54] (n=128)`, flagged when n is too small for the value to mean much."""
    if rho is None:
        return "–"
    text = fmt(rho, spec)
    if interval:
        text += f" [{fmt(interval[0], spec)}, {fmt(interval[1], spec)}]"
    if n is None:
        return text
    text = f"{text} (n={fmt(n, 'd')})"
    if n < MIN_SPEARMAN_N:
        text += (
            f' <span class="warn" title="a rank correlation over fewer than {MIN_SPEARMAN_N} '
            'points is mostly noise">too few to read</span>'
        )
    return text


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by their makers); the head is escaped here."""
    attr = f' class="{cls}"' if cls else ""
    return (
        f"<table{attr}><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )


def stage_table(view: dict) -> str:
    head = [
        "stage",
        "state",
        *PHASES,
        "held-out loss",
        "after lr cooldown",
        "probes",
        "influence-model Spearman (cross-validated)",
        "first-order Spearman",
        "selected",
        "overlap with previous",
    ]
    rows = []
    for st in view["stages"]:
        state = html.escape(str(st["state"]))
        cool = st.get("cooldown") or {}
        rows.append(
            [
                str(st["stage"]),
                f'<span class="state-{state}">{state}</span>',
                *[fmt(st["seconds"][p], ".1f") for p in PHASES],
                fmt(st["heldout_loss"]),
                fmt(cool.get("loss")),
                fmt(st["probe_count"], "d"),
                spearman_text(st["val_spearman"], st.get("val_n"), interval=st.get("cv_interval")),
                spearman_text(st["first_order_spearman"], st.get("first_order_n"), ".3f"),
                fmt(st["selected"], "d")
                + (
                    f' <span class="warn" title="the influence model did not pass the quality gate">'
                    f"{html.escape(str(st['fallback']))} (gate)</span>"
                    if st.get("fallback")
                    else ""
                ),
                fmt(st["overlap_with_previous"], ".0%"),
            ]
        )
    return _table(head, rows)


def _selection_text(c: dict) -> str:
    method, sampler = c.get("selection_method"), c.get("sampler")
    text = fmt(method) + (f" ({fmt(sampler)} sampler)" if sampler and sampler != method else "")
    text += f", keep {fmt(c.get('selection_ratio'), '.0%')} of each pool, "
    return (
        text
        + f"temperature τ = {fmt(c.get('temperature'), 'g')}"
        + ("" if sampler == "gumbel" else " (used by the gumbel sampler only)")
    )


def _config_rows(c: dict) -> list[list[str]]:
    lr = c.get("probe_lr")
    train_encoder = c.get("train_encoder")
    enc = (
        " (fine-tuned)" if train_encoder is True else " (frozen)" if train_encoder is False else ""
    )
    return [
        ["selection", _selection_text(c)],
        [
            "probing",
            f"{fmt(c.get('probe_method'))}, {fmt(c.get('num_probes'), ',d')} probes per stage, "
            f"probe lr {'the current train lr' if lr is None else fmt(lr, 'g')}",
        ],
        [
            "influence model",
            f"encoder {fmt(c.get('influence_encoder'))}{enc}, "
            + (
                "ridge head, "
                if c.get("head_fit") == "ridge" and c.get("train_encoder") is False
                else f"{fmt(c.get('influence_epochs'), 'd')} epochs, "
            )
            + f"chosen by {fmt(c.get('cv_folds'), 'd')}-fold cross-validation",
        ],
        ["budget", budget_text(c)],
        [
            "tokens",
            f"{fmt(c.get('batch_sequences'), 'd')} sequences × {fmt(c.get('seq_tokens'), ',d')} "
            f"tokens = {fmt(c.get('tokens_per_step'), ',d')} tokens per step; "
            f"{fmt(c.get('total_tokens'), ',d')} in {fmt(c.get('total_steps'), ',d')} steps",
        ],
        ["seed", fmt(c.get("seed"), "d")],
    ]


def config_table(view: dict) -> str:
    """The run's resolved config, one line per concern."""
    return _table(["setting", "value"], _config_rows(view.get("config") or {}), cls="config")


def _rel(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else elapsed_text(seconds)


HISTORY_CLASS = {
    "failed": "state-failed",
    "cancelled": "state-cancelled",
    "resumed": "state-resumed",
}


def _history_piece(h: dict, t0: float) -> str:
    what = html.escape(str(h["what"]))
    if h["kind"] == "resumed":
        what = f"resumed ({html.escape(str(h.get('from')))} → {what})"
    if h.get("detail"):
        what += f": {html.escape(str(h['detail']))}"
    cls = HISTORY_CLASS.get(h["kind"]) or ("state-done" if h["what"] == "done" else None)
    if cls:
        what = f'<span class="{cls}">{what}</span>'
    return f'{what} <span class="muted">+{_rel(h["at"] - t0)}</span>'


def history_list(view: dict) -> str:
    """The run's history, oldest first, times since its creation; a stage's ordinary
    transitions share a line, and each failure and resumption starts its own."""
    t0, items, group = view["created_at"], [], None
    for h in view.get("history") or []:
        piece = _history_piece(h, t0)
        if h["kind"] == "transition" and group is not None and group == h["stage"]:
            items[-1] += " · " + piece
            continue
        prefix = "" if h["stage"] is None else f"stage {html.escape(str(h['stage']))}: "
        items.append(prefix + piece)
        group = h["stage"] if h["kind"] in ("transition", "resumed") else None
    return '<ol class="history">' + "".join(f"<li>{i}</li>" for i in items) + "</ol>"


def _final(curve: list[dict]) -> dict | None:
    return next((r for r in reversed(curve) if r.get("heldout_loss") is not None), None)


def arms_table(view: dict, arms: list[dict]) -> str:
    """This run and every other arm drawn on its loss chart, at their latest point."""

    def row(label: str, v: dict) -> list[str]:
        last = _final(v["curve"]) or {}
        cool = (
            next((st["cooldown"] for st in reversed(v["stages"]) if st.get("cooldown")), None) or {}
        )
        return [
            label,
            html.escape(v["run_id"]),
            html.escape(v["status"]),
            fmt(last.get("tokens"), ",d"),
            fmt(last.get("heldout_loss")),
            fmt(cool.get("loss")),
        ]

    rows = [row("<b>this run</b>", view)]
    rows += [row(html.escape(str(a.get("label") or a["name"])), a) for a in arms]
    return _table(
        ["arm", "run", "status", "tokens", "latest held-out loss", "after lr cooldown"], rows
    )


def run_body(view: dict, svgs: dict[str, str], arms: list[dict] | None = None) -> str:
    """The run's section: summary, config, history, stage table, and its charts (no <html>
    wrapper); `arms` are the other arms drawn on its loss chart."""
    final = next(
        (s["heldout_loss"] for s in reversed(view["stages"]) if s["heldout_loss"] is not None), None
    )
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view["created_at"]))
    parts = [
        f'<h2>{html.escape(view["name"])} <span class="muted">{html.escape(view["run_id"])}</span></h2>',
        f'<p>status <b class="state-{html.escape(view["status"])}">{html.escape(view["status"])}</b>, '
        f"stage {fmt(view['current_stage'], 'd')}, elapsed {elapsed_text(view['elapsed_s'])}, "
        f"latest held-out loss {fmt(final)}</p>",
    ]
    if view.get("error"):
        parts.append(f'<p class="state-failed">error: {html.escape(str(view["error"]))}</p>')
    parts += [
        f'<p class="sign" id="sign">{SIGN_TEXT}</p>',
        "<h3>Config</h3>",
        config_table(view),
        f'<h3>History <span class="muted">since {created}</span></h3>',
        history_list(view),
        "<h3>Stages</h3>",
        stage_table(view),
        "<h3>Loss against training tokens</h3>",
        f'<div class="chart" id="chart-loss">{svgs["loss"]}</div>',
    ]
    if arms:
        parts.append(arms_table(view, arms))
    parts += [
        "<h3>Stage timeline</h3>",
        f'<div class="chart" id="chart-timeline">{svgs["timeline"]}</div>',
    ]
    parts += _stage_sections(view, svgs)
    return "\n".join(parts)


def _stage_sections(view: dict, svgs: dict[str, str]) -> list[str]:
    parts = []
    for st, nxt in zip(view["stages"], view["stages"][1:], strict=False):
        k, k1 = st["stage"], nxt["stage"]
        dist, dom = svgs.get(f"distribution-{k}"), svgs.get(f"domains-{k1}")
        if not dist and not dom:
            continue
        # stage k's checkpoint is probed, its influence model scores stage k+1's pool,
        # and the selection it makes is the one stage k+1 trains on
        parts.append(
            f"<h3>Stage {k} → {k1}: probes at stage {k}'s checkpoint, "
            f"stage {k1}'s pool scores and selection</h3>"
        )
        parts.append(
            f'<p class="muted">influence-model cross-validated Spearman '
            f"{spearman_text(st['val_spearman'], st.get('val_n'), interval=st.get('cv_interval'))}; "
            f"stage {k1}'s selection shares "
            f"{fmt(nxt['overlap_with_previous'], '.0%')} of its documents with stage {k}'s; "
            f"lower influence / score = more helpful</p>"
        )
        for name, key, svg in (("distribution", k, dist), ("domains", k1, dom)):
            if svg:
                parts.append(f'<div class="chart" id="chart-{name}-{key}">{svg}</div>')
    return parts


def page(title: str, body: str, head_extra: str = "") -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style>{head_extra}</head>"
        f"<body>{body}</body></html>"
    )


def render_report(view: dict, baseline: dict | None = None, arms: list[dict] | None = None) -> str:
    """The report page: the run with `baseline` (a full view, also reported below it) and
    `arms` (overlay views) drawn on its loss chart."""
    overlays = as_overlays(baseline) + list(arms or [])
    body = [
        f"<h1>MATES run report: {html.escape(view['name'])}</h1>",
        run_body(view, charts(view, overlays), overlays),
    ]
    if baseline:
        body += ["<hr>", "<h1>Baseline arm</h1>", run_body(baseline, charts(baseline))]
    body.append(
        f'<p class="muted">written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} '
        "by mates report</p>"
    )
    return page(f"MATES report {view['run_id']}", "\n".join(body))


def write_report(run_dir: Path, out: Path | None = None, baseline_dir: Path | None = None) -> Path:
    """Write a self-contained HTML report of a run to `out`, with a baseline arm's curve and
    section when given one, else with the curves of its comparison's other arms."""
    view = run_view(run_dir)
    baseline = run_view(baseline_dir) if baseline_dir else None
    arms = None if baseline_dir else arm_overlays(Path(run_dir))
    out = Path(out) if out else Path(run_dir) / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(render_report(view, baseline, arms), encoding="utf-8")
    return out
