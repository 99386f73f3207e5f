"""The run's charts as inline SVG (matplotlib): loss with the arms dashed, the stage timeline,
each stage's influence and score distributions and what its selection kept."""

from __future__ import annotations

import io
import logging

import numpy as np

from mates.report.views import PHASE_COLORS, PHASES

log = logging.getLogger(__name__)


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prologue so the SVG can sit inline


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h), dpi=100)


OVERLAY_COLORS = (
    "#7f7f7f",
    "#e45756",
    "#54a24b",
    "#b279a2",
    "#9d755d",
    "#eeca3b",
    "#72b7b2",
    "#ff9da6",
)  # the first (grey) goes to the random arm, listed first
SIGN_NOTE = "lower = more helpful"


def _mpl(text: str) -> str:
    """A label as matplotlib draws it literally (a `$` would start math text)."""
    return str(text).replace("$", r"\$")


def as_overlays(baseline: dict | list[dict] | None) -> list[dict]:
    if baseline is None:
        return []
    return [baseline] if isinstance(baseline, dict) else list(baseline)


def _cooldown_points(view: dict) -> list[tuple[float, float]]:
    return [
        (st["cooldown"]["tokens"] / 1e6, st["cooldown"]["loss"])
        for st in view.get("stages", [])
        if st.get("cooldown")
    ]


def _plot_cooldown(ax, view: dict, color: str, label: str) -> None:
    pts = _cooldown_points(view)
    if pts:
        ax.plot(*zip(*pts, strict=True), "D", ms=6, mfc="none", mew=1.5, color=color, label=label)


def loss_chart(view: dict, baseline: dict | list[dict] | None = None) -> str:
    """Held-out (and reference) loss against tokens, the other arms' held-out curves
    dashed, and each stage end's loss after an lr cooldown as hollow diamonds."""
    fig, ax = _figure(7.5, 3.6)
    pts = [r for r in view["curve"] if r.get("heldout_loss") is not None]
    x = [r["tokens"] / 1e6 for r in pts]
    ax.plot(x, [r["heldout_loss"] for r in pts], "-o", ms=3, color="#4c78a8", label="held-out")
    ref = [
        (t, r["reference_loss"])
        for t, r in zip(x, pts, strict=True)
        if r.get("reference_loss") is not None
    ]
    if ref:
        ax.plot(*zip(*ref, strict=True), "-", color="#f58518", alpha=0.8, label="reference")
    cool = next((st["cooldown"]["set"] for st in view["stages"] if st.get("cooldown")), None)
    _plot_cooldown(ax, view, "#1f3b63", f"after lr cooldown ({_mpl(str(cool))})")
    for i, other in enumerate(as_overlays(baseline)):
        color, name = (
            OVERLAY_COLORS[i % len(OVERLAY_COLORS)],
            _mpl(other.get("label") or other["name"]),
        )
        bp = [r for r in other["curve"] if r.get("heldout_loss") is not None]
        ax.plot(
            [r["tokens"] / 1e6 for r in bp],
            [r["heldout_loss"] for r in bp],
            "--",
            color=color,
            label=f"held-out, {name}",
        )
        _plot_cooldown(ax, other, color, f"after lr cooldown, {name}")
    for st in view["stages"][1:]:  # stage boundaries
        first = next((r for r in pts if r["stage"] == st["stage"]), None)
        if first:
            ax.axvline(first["tokens"] / 1e6, color="#bbbbbb", lw=0.8, ls=":")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
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


def _score_hist(ax, stage: dict) -> None:
    """The scored pool's histogram, the kept documents' over it, and the selection's cut."""
    vals = np.asarray(stage["scores"], dtype=float)
    bins = np.histogram_bin_edges(vals, bins=min(30, max(5, len(vals) // 4)))
    ax.hist(vals, bins=bins, color="#c6d7ea", label=f"pool, n={len(vals)}")
    kept = stage.get("kept")
    if kept:
        chosen = vals[np.asarray(kept, dtype=bool)]
        ax.hist(
            chosen,
            bins=bins,
            color="#4c78a8",
            label=f"kept by stage {stage['stage'] + 1}, n={len(chosen)}",
        )
    cut = stage.get("cut")
    if cut:
        ax.axvline(
            cut["score"],
            color="#e45756",
            lw=1.2,
            ls="--",
            label=f"{cut['label']} ({cut['score']:.3g})",
        )
    if kept or cut:
        ax.legend(fontsize=6, loc="best")


def distribution_chart(stage: dict) -> str | None:
    """Histograms of the oracle influences and of the predicted scores of one stage; the
    scores' shows what the next stage's selection kept and where it cut."""
    if not stage["influences"] and not stage["scores"]:
        return None
    fig, axes = _figure(7.5, 2.8)
    fig.clf()
    for j, (key, label) in enumerate(
        (("influences", "oracle influence (probes)"), ("scores", "predicted score (pool, z-units)"))
    ):
        ax = fig.add_subplot(1, 2, j + 1)
        vals = np.asarray(stage[key], dtype=float)
        if key == "scores" and len(vals):
            _score_hist(ax, stage)
        elif len(vals):
            ax.hist(vals, bins=min(30, max(5, len(vals) // 4)), color="#f58518")
        ax.set_title(f"{label}, n={len(vals)}", fontsize=9)
        ax.set_xlabel(f"← {SIGN_NOTE}      higher = less helpful →", fontsize=7)
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


def charts(view: dict, baseline: dict | list[dict] | None = None) -> dict[str, str]:
    """Every chart of a run as inline SVG; `baseline` is one arm's view or a list of them."""
    out = {"loss": loss_chart(view, baseline), "timeline": timeline_chart(view)}
    for st in view["stages"]:
        for name, fn in (("distribution", distribution_chart), ("domains", domain_chart)):
            svg = fn(st)
            if svg:
                out[f"{name}-{st['stage']}"] = svg
    return out
