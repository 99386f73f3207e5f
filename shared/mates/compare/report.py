"""The comparison's self-contained HTML page (report.html): the table, the chart, every
held-out set and the run folders."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from mates.artifacts import atomic_path
from mates.compare.table import _pm, _range, table_rows


def write_comparison_report(summary: dict, png: Path, out: Path) -> None:
    """One self-contained HTML page: the table, the chart, secondary sets and the ledger."""
    from mates.report import page

    esc = html.escape
    rows = table_rows(summary)
    table = (
        "<table><tr>"
        + "".join(f"<th>{esc(c)}</th>" for c in rows[0])
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        + "</table>"
    )
    sets = summary["heldout_sets"]
    sec = (
        "<table><tr><th>arm</th>"
        + "".join(f"<th>{esc(s)}</th>" for s in sets)
        + "</tr>"
        + "".join(
            f"<tr><td>{esc(a)}</td>"
            + "".join(f"<td>{esc(_pm(summary['summary'][a]['final'][s]))}</td>" for s in sets)
            + "</tr>"
            for a in summary["arms"]
        )
        + "</table>"
    )
    img = base64.b64encode(Path(png).read_bytes()).decode()
    links = "".join(
        f"<li>{esc(a)}: "
        + ", ".join(f"<code>{esc(v['run_dir'])}</code>" for v in summary["runs"][a].values())
        + "</li>"
        for a in summary["arms"]
    )
    aa = summary.get("aa_spread")
    body = (
        f"<h1>Comparison {esc(summary['name'])}</h1>"
        f"<p>{len(summary['seeds'])} seeds; each arm read after an lr cooldown at every stage end; "
        f"lower loss is better; Δ &lt; 0 beats random.</p>{table}"
        + (
            f"<p>A/A spread (random-aa − random, final): {esc(_range(aa['final']))}</p>"
            if aa
            else ""
        )
        + f'<img alt="mean curves" src="data:image/png;base64,{img}" style="max-width:100%">'
        f"<h2>Every held-out set (final, mean ± CI)</h2>{sec}<h2>Runs</h2><ul>{links}</ul>"
    )
    with atomic_path(out) as tmp:
        tmp.write_text(page(f"comparison {summary['name']}", body), encoding="utf-8")
