"""What a run looks like: its curves, stage timeline, influences and selections.

`run_view(run_dir)` gathers everything a person judges a run by into plain data: its
resolved config, its history (transitions, failures, resumptions, logged events), per-stage
statistics (each Spearman with the number of points behind it, what the selection kept) and
loss points (with the lr-cooldown evaluations where run). `charts(view, arms)` draws it as
inline SVG with matplotlib, the other arms of its comparison (`sibling_arms`) dashed on the
loss chart; `render_report` lays both out as one self-contained page, which `mates report`
writes and the API's dashboard serves. Throughout, lower influence / score = more helpful.
One module each: `views` (the data), `charts` (the SVG), `html` (the pages), over `text`.
"""

from mates.report.charts import charts, distribution_chart, domain_chart, loss_chart, timeline_chart
from mates.report.html import (
    CSS,
    arms_table,
    config_table,
    elapsed_text,
    history_list,
    page,
    render_report,
    run_body,
    spearman_text,
    stage_table,
    write_report,
)
from mates.report.views import arm_overlays, config_summary, overlay_view, run_view, sibling_arms

__all__ = [
    "CSS",
    "arm_overlays",
    "arms_table",
    "charts",
    "config_summary",
    "config_table",
    "distribution_chart",
    "domain_chart",
    "elapsed_text",
    "history_list",
    "loss_chart",
    "overlay_view",
    "page",
    "render_report",
    "run_body",
    "run_view",
    "sibling_arms",
    "spearman_text",
    "stage_table",
    "timeline_chart",
    "write_report",
]
