"""What a run looks like: its curves, stage timeline, influences and selections.

`run_view(run_dir)` gathers everything a person judges a run by into plain data: its
resolved config, its history (transitions, failures, resumptions, logged events), per-stage
statistics (each Spearman with the number of points behind it, what the selection kept) and
loss points (with the lr-cooldown evaluations where run). `charts(view, arms)` draws it as
inline SVG with matplotlib, the other arms of its comparison (`sibling_arms`) dashed on the
loss chart; `render_report` lays both out as one self-contained page, which `mates report`
writes and the API's dashboard serves. Throughout, lower influence / score = more helpful.
"""

from __future__ import annotations

import html
import io
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from mates.artifacts import RunPaths, atomic_path, read_json, read_jsonl
from mates.errors import ArtifactError, MatesError

log = logging.getLogger(__name__)

PHASES = ("training", "probing", "fitting", "scoring", "selecting")
PHASE_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756")


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _selection(paths: RunPaths, k: int) -> dict | None:
    path = paths.selection(k)
    return read_json(path) if path.is_file() else None


def _domain_shift(sel: dict) -> dict[str, dict[str, float]]:
    """Share of each domain in the selection and in the pool it was drawn from."""
    chosen, pool = sel.get("domains") or {}, sel.get("pool_domains") or {}
    if not pool or set(pool) == {"-"}:
        return {}  # the corpus has no domain field
    n_sel, n_pool = max(sum(chosen.values()), 1), max(sum(pool.values()), 1)
    return {d: {"selected": chosen.get(d, 0) / n_sel, "pool": pool[d] / n_pool} for d in sorted(pool)}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _budget_text(c: dict) -> str:
    steps = (f"{_fmt(c.get('num_stages'), 'd')} stages: {_fmt(c.get('stage0_steps'), ',d')} steps "
             f"in stage 0, {_fmt(c.get('stage_steps'), ',d')} in each later one")
    if c.get("stage_tokens") is not None:
        multiple = c.get("pool_multiple")
        pool = (f"{_fmt(multiple, 'g')}x" if multiple is not None else "1 / ratio times")
        budget = (f"token budgets of {_fmt(c.get('stage0_tokens'), ',d')} (stage 0) and "
                  f"{_fmt(c.get('stage_tokens'), ',d')}, one epoch each; later pools {pool} the budget")
    else:
        budget = f"{_fmt(c.get('pool_docs'), ',d')} pool documents per stage"
    chunks = c.get("chunk_tokens")
    units = f"; documents cut into units of at most {_fmt(chunks, ',d')} tokens" if chunks else ""
    return f"{steps}; {budget} ({_fmt(c.get('pool_mode'))} pools){units}{_cooldown_text(c)}"


def config_summary(cfg: dict) -> dict[str, Any]:
    """The settings a reader of a run needs first, flat, from run.json's resolved config."""
    def get(section: str, key: str) -> Any:
        return (cfg.get(section) or {}).get(key)

    seq, batch = get("train", "seq_tokens"), get("train", "batch_sequences")
    per_step = seq * batch if _num(seq) and _num(batch) else None
    n, s0, s = get("stages", "num_stages"), get("stages", "stage0_steps"), get("stages", "stage_steps")
    t0, t = get("stages", "stage0_tokens"), get("stages", "stage_tokens")
    if _num(t0) and _num(t) and per_step:  # token budgets: whole steps (RunConfig.stage_steps)
        s0, s = max(1, -(-t0 // per_step)), max(1, -(-t // per_step))
    steps = s0 + (n - 1) * s if _num(n) and _num(s0) and _num(s) else None
    method = get("selection", "method")
    sampler = (method if method in ("gumbel", "topk")
               else get("selection", "sampler") if method in ("mates", "static") else None)
    return {
        "seed": cfg.get("seed"),
        "selection_method": method, "sampler": sampler, "selection_ratio": get("selection", "ratio"),
        "temperature": get("selection", "temperature"), "cooldown_fraction": get("train", "cooldown_fraction"),
        "probe_method": get("probing", "method"), "num_probes": get("probing", "num_probes"),
        "probe_lr": get("probing", "lr"),
        "influence_encoder": get("influence", "encoder"), "influence_epochs": get("influence", "epochs"),
        "train_encoder": get("influence", "train_encoder"),
        "head_fit": get("influence", "head_fit"), "cv_folds": get("influence", "cv_folds"),
        "num_stages": n, "stage0_steps": s0, "stage_steps": s, "pool_docs": get("stages", "pool_docs"),
        "stage0_tokens": t0, "stage_tokens": t, "pool_multiple": get("stages", "pool_multiple"),
        "pool_mode": get("stages", "pool_mode"), "chunk_tokens": get("data", "chunk_tokens"),
        "batch_sequences": batch, "seq_tokens": seq, "tokens_per_step": per_step,
        "total_steps": steps, "total_tokens": per_step * steps if per_step and steps else None,
    }


def _transitions(m: dict) -> list[dict]:
    """Every stage's state changes but its initial `pending`. A stage leaving `failed` or
    `cancelled` for another state is a resumption."""
    rows = []
    for st in m["stages"]:
        prev = None
        for t in st.get("transitions") or []:
            state = str(t.get("state"))
            if prev is None and state == "pending":
                prev = state
                continue  # every stage is created pending with the run
            kind = ("resumed" if prev in ("failed", "cancelled")
                    else state if state in ("failed", "cancelled") else "transition")
            rows.append({"at": t.get("at"), "stage": st["stage"], "what": state, "kind": kind,
                         "from": prev, "detail": t.get("error"), "source": "stage"})
            prev = state
    return rows


def _history(m: dict, events: list[dict]) -> list[dict]:
    """The run's history, oldest first: its creation, every stage transition, and the
    events logged in events.jsonl (failures with their reason, scorer waits, warnings)."""
    rows = [{"at": m["created_at"], "stage": None, "what": "run created", "kind": "run",
             "detail": None, "source": "run"}, *_transitions(m)]
    for e in events:
        what = str(e.get("event") or "event")
        rows.append({"at": e.get("at"), "stage": e.get("stage"), "what": what,
                     "kind": "failed" if what == "failed" else "event", "source": "event",
                     "detail": e.get("reason") or e.get("message") or e.get("error")})
    rows = sorted((r for r in rows if _num(r["at"])), key=lambda r: r["at"])
    return _merge_failures(rows, {st["stage"]: st.get("error") for st in m["stages"]})


def _is_stage_end(r: dict) -> bool:
    return r["source"] == "stage" and r["kind"] in ("failed", "cancelled")


def _merge_failures(rows: list[dict], stage_errors: dict) -> list[dict]:
    """A stage's `failed` transition takes the reason of the `failed` event logged with it
    (within a minute), which is then not listed twice; a stage failed now keeps its error."""
    used: set[int] = set()
    for r in filter(_is_stage_end, rows):
        i = next((i for i, e in enumerate(rows) if i not in used and e["source"] == "event"
                  and e["kind"] == "failed" and e["stage"] == r["stage"]
                  and abs(e["at"] - r["at"]) < 60), None)
        if i is not None:
            used.add(i)
            r["detail"] = r["detail"] or rows[i]["detail"]
    latest = {r["stage"]: r for r in filter(_is_stage_end, rows)}
    for k, r in latest.items():
        r["detail"] = r["detail"] or stage_errors.get(k)
    return [r for i, r in enumerate(rows) if i not in used]


def _val_n(fit: dict, probes: dict, cfg: dict) -> int | None:
    """Points behind the influence model's validation Spearman: the fit's `val_size` (every
    probe, predicted out of fold, since fits are cross-validated), or for a run from before
    that, the held-out share of the probes as the 90/10 split took it."""
    if _num(fit.get("val_size")):
        return int(fit["val_size"])
    count, frac = probes.get("count"), (cfg.get("influence") or {}).get("val_fraction", 0.1)
    if not fit or not _num(count) or not _num(frac):
        return None
    return max(2, int(round(count * frac)))


def _kept(rows: list[dict], sel: dict | None) -> list[bool] | None:
    """Which scored documents the next stage's selection kept, aligned with `rows`."""
    if not rows or not sel or "ids" not in sel:
        return None
    ids = set(sel["ids"])
    return [r.get("id") in ids for r in rows]


def _cut(scores: list[float], kept: list[bool] | None, sel: dict | None) -> dict | None:
    """Where the selection cut the scores: top-k keeps every score up to the largest kept
    one; Gumbel sampling keeps a spread, so its line is the kept scores' 90th percentile."""
    vals = [s for s, k in zip(scores, kept or [], strict=False) if k]
    method = (sel or {}).get("sampler") or (sel or {}).get("method")
    if not vals or method not in ("topk", "gumbel"):
        return None
    if method == "topk":
        return {"method": method, "score": float(max(vals)), "label": "cut: every kept score ≤ this"}
    return {"method": method, "score": float(np.quantile(vals, 0.9)),
            "label": "90% of kept scores ≤ this"}


def _cooldown(paths: RunPaths, k: int) -> dict | None:
    """The primary set's held-out evaluation after stage k's lr-cooldown branch, if run."""
    path = paths.cooldown(k)
    if not path.is_file():
        return None
    c = read_json(path)
    primary = c.get("primary")
    point = (c.get("sets") or {}).get(primary) or {}
    if not _num(point.get("loss")) or not _num(c.get("tokens")):
        return None
    return {"tokens": c["tokens"], "set": primary, "loss": point["loss"],
            "accuracy": point.get("accuracy"), "kind": point.get("kind")}


def _stage_view(paths: RunPaths, st: dict, cfg: dict, sel: dict | None, prev: dict | None,
                nxt: dict | None) -> dict[str, Any]:
    """One stage; `sel` is the selection it trained on, `prev` the stage before's and `nxt`
    the next stage's (drawn from the pool this stage's model scored)."""
    k, met = st["stage"], st.get("metrics") or {}
    probes, fit = met.get("probes") or {}, met.get("influence_model") or {}
    overlap = None
    if sel and prev and sel.get("ids") and prev.get("ids"):
        ids = set(sel["ids"])
        overlap = len(ids & set(prev["ids"])) / len(ids)
    score_rows = _rows(paths.scores(k))
    scores = [r["score"] for r in score_rows]
    kept = _kept(score_rows, nxt)
    fo = probes.get("first_order_spearman")
    return {
        "stage": k, "state": st["state"],
        "seconds": {p: st.get("timings", {}).get(p) for p in PHASES},
        "heldout_loss": met.get("heldout_loss"), "reference_loss": met.get("reference_loss"),
        "tokens": met.get("tokens"),
        "probe_method": probes.get("method"), "probe_count": probes.get("count"),
        "first_order_spearman": fo, "first_order_n": probes.get("exact_subset") if fo is not None else None,
        "val_spearman": fit.get("val_spearman"), "val_n": _val_n(fit, probes, cfg),
        "cv_interval": ([fit["cv_low"], fit["cv_high"]] if _num(fit.get("cv_low")) and _num(fit.get("cv_high"))
                        else None),
        "shared_effect": probes.get("shared_effect"),
        "selected": (met.get("selection") or {}).get("selected"),
        "fallback": (met.get("selection") or {}).get("fallback"),
        "selection_method": (met.get("selection") or {}).get("method"),
        "overlap_with_previous": overlap,
        "domain_shift": _domain_shift(met.get("selection") or {}),
        "influences": [r["influence"] for r in _rows(paths.probes(k))],
        "scores": scores, "kept": kept, "cut": _cut(scores, kept, nxt),
        "cooldown": _cooldown(paths, k),
        "error": st.get("error"),
    }


def run_view(run_dir: Path) -> dict[str, Any]:
    """A run's state, curves and per-stage statistics, read from its directory."""
    paths = RunPaths(Path(run_dir))
    if not paths.manifest.is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no run.json)")
    m = read_json(paths.manifest)
    end = m["updated_at"] if m["status"] in ("done", "failed", "cancelled") else time.time()
    cfg = m.get("config") or {}
    sels = [_selection(paths, st["stage"]) for st in m["stages"]]
    stages = [_stage_view(paths, st, cfg, sels[i], sels[i - 1] if i else None,
                          sels[i + 1] if i + 1 < len(sels) else None)
              for i, st in enumerate(m["stages"])]
    return {
        "run_id": m["run_id"], "name": m["name"], "status": m["status"],
        "current_stage": m.get("current_stage"), "error": m.get("error"),
        "created_at": m["created_at"], "elapsed_s": max(0.0, end - m["created_at"]),
        "config": config_summary(cfg),
        "history": _history(m, _rows(paths.events)),
        "curve": _curve(paths),
        "stages": stages,
    }


def _curve(paths: RunPaths) -> list[dict]:
    return [{k: r.get(k) for k in ("stage", "step", "tokens", "heldout_loss", "reference_loss")}
            for r in _rows(paths.metrics)]


def overlay_view(run_dir: Path, label: str | None = None) -> dict[str, Any]:
    """What another arm contributes to a run's loss chart: its held-out curve and cooldown
    points, named `label` (its folder in a comparison) or else its run name."""
    paths = RunPaths(Path(run_dir))
    if not paths.manifest.is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no run.json)")
    m = read_json(paths.manifest)
    return {"run_id": m["run_id"], "name": m["name"], "status": m["status"],
            "label": label or m["name"],
            "selection_method": ((m.get("config") or {}).get("selection") or {}).get("method"),
            "curve": _curve(paths),
            "stages": [{"stage": st["stage"], "cooldown": _cooldown(paths, st["stage"]),
                        "heldout_loss": (st.get("metrics") or {}).get("heldout_loss")}
                       for st in m["stages"]]}


SEED_DIR = re.compile(r"seed-\d+")


def sibling_arms(run_dir: Path) -> list[Path]:
    """The other arms of the comparison a run directory belongs to, random first: every
    sibling with a run.json in `mates compare`'s `DIR/seed-<s>/<arm>/`, or the `random/`
    beside a `mates/` (the older two-arm layout; its random arm gets none)."""
    here = Path(run_dir)
    parent = here.parent
    if SEED_DIR.fullmatch(parent.name):
        arms = [p for p in parent.iterdir()
                if p.name != here.name and p.is_dir() and RunPaths(p).manifest.is_file()]
        return sorted(arms, key=lambda p: (p.name != "random", p.name))
    if here.name == "mates" and RunPaths(parent / "random").manifest.is_file():
        return [parent / "random"]
    return []


def arm_overlays(run_dir: Path) -> list[dict]:
    """Overlay views of the run's sibling arms, each named by its folder; an arm whose
    artifacts cannot be read is left out rather than failing the run's page."""
    out = []
    for arm in sibling_arms(run_dir):
        try:
            out.append(overlay_view(arm, arm.name))
        except (MatesError, OSError, KeyError, ValueError, TypeError) as e:
            log.warning("arm %s left out of %s's charts: %s", arm, run_dir, e)
    return out


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


OVERLAY_COLORS = ("#7f7f7f", "#e45756", "#54a24b", "#b279a2", "#9d755d", "#eeca3b", "#72b7b2",
                  "#ff9da6")  # the first (grey) goes to the random arm, listed first
SIGN_NOTE = "lower = more helpful"


def _mpl(text: str) -> str:
    """A label as matplotlib draws it literally (a `$` would start math text)."""
    return str(text).replace("$", r"\$")


def _overlays(baseline: dict | list[dict] | None) -> list[dict]:
    if baseline is None:
        return []
    return [baseline] if isinstance(baseline, dict) else list(baseline)


def _cooldown_points(view: dict) -> list[tuple[float, float]]:
    return [(st["cooldown"]["tokens"] / 1e6, st["cooldown"]["loss"])
            for st in view.get("stages", []) if st.get("cooldown")]


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
    ref = [(t, r["reference_loss"]) for t, r in zip(x, pts, strict=True) if r.get("reference_loss") is not None]
    if ref:
        ax.plot(*zip(*ref, strict=True), "-", color="#f58518", alpha=0.8, label="reference")
    cool = next((st["cooldown"]["set"] for st in view["stages"] if st.get("cooldown")), None)
    _plot_cooldown(ax, view, "#1f3b63", f"after lr cooldown ({_mpl(cool)})")
    for i, other in enumerate(_overlays(baseline)):
        color, name = OVERLAY_COLORS[i % len(OVERLAY_COLORS)], _mpl(other.get("label") or other["name"])
        bp = [r for r in other["curve"] if r.get("heldout_loss") is not None]
        ax.plot([r["tokens"] / 1e6 for r in bp], [r["heldout_loss"] for r in bp], "--",
                color=color, label=f"held-out, {name}")
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
        ax.hist(chosen, bins=bins, color="#4c78a8", label=f"kept by stage {stage['stage'] + 1}, n={len(chosen)}")
    cut = stage.get("cut")
    if cut:
        ax.axvline(cut["score"], color="#e45756", lw=1.2, ls="--",
                   label=f"{cut['label']} ({cut['score']:.3g})")
    if kept or cut:
        ax.legend(fontsize=6, loc="best")


def distribution_chart(stage: dict) -> str | None:
    """Histograms of the oracle influences and of the predicted scores of one stage; the
    scores' shows what the next stage's selection kept and where it cut."""
    if not stage["influences"] and not stage["scores"]:
        return None
    fig, axes = _figure(7.5, 2.8)
    fig.clf()
    for j, (key, label) in enumerate((("influences", "oracle influence (probes)"),
                                      ("scores", "predicted score (pool, z-units)"))):
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


# --------------------------------------------------------------------------- HTML

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
SIGN_TEXT = ("Sign convention: an influence is the change in the reference loss after one "
             "training step on the document, so <b>LOWER influence / score = MORE HELPFUL</b>; "
             "the selection keeps the lowest predicted scores.")


def elapsed_text(seconds: float) -> str:
    """A duration as people read it: `42 s`, `3.5 min`, `2.1 h`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    if _num(v):
        try:
            return format(v, spec)
        except ValueError:  # a float where an int was expected
            return format(v, "g")
    return html.escape(str(v))


def spearman_text(rho: float | None, n: int | None, spec: str = ".2f",
                  interval: list[float] | None = None) -> str:
    """`0.41 [0.26, 0.54] (n=128)`, flagged when n is too small for the value to mean much."""
    if rho is None:
        return "–"
    text = _fmt(rho, spec)
    if interval:
        text += f" [{_fmt(interval[0], spec)}, {_fmt(interval[1], spec)}]"
    if n is None:
        return text
    text = f"{text} (n={_fmt(n, 'd')})"
    if n < MIN_SPEARMAN_N:
        text += (f' <span class="warn" title="a rank correlation over fewer than {MIN_SPEARMAN_N} '
                 'points is mostly noise">too few to read</span>')
    return text


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by their makers); the head is escaped here."""
    attr = f' class="{cls}"' if cls else ""
    return (f"<table{attr}><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def stage_table(view: dict) -> str:
    head = ["stage", "state", *PHASES, "held-out loss", "after lr cooldown", "probes",
            "influence-model Spearman (cross-validated)", "first-order Spearman", "selected",
            "overlap with previous"]
    rows = []
    for st in view["stages"]:
        state = html.escape(str(st["state"]))
        cool = st.get("cooldown") or {}
        rows.append([str(st["stage"]), f'<span class="state-{state}">{state}</span>',
                     *[_fmt(st["seconds"][p], ".1f") for p in PHASES], _fmt(st["heldout_loss"]),
                     _fmt(cool.get("loss")), _fmt(st["probe_count"], "d"),
                     spearman_text(st["val_spearman"], st.get("val_n"), interval=st.get("cv_interval")),
                     spearman_text(st["first_order_spearman"], st.get("first_order_n"), ".3f"),
                     _fmt(st["selected"], "d") + (
                         f' <span class="warn" title="the influence model did not pass the quality gate">'
                         f'{html.escape(str(st["fallback"]))} (gate)</span>' if st.get("fallback") else ""),
                     _fmt(st["overlap_with_previous"], ".0%")])
    return _table(head, rows)


def _selection_text(c: dict) -> str:
    method, sampler = c.get("selection_method"), c.get("sampler")
    text = _fmt(method) + (f" ({_fmt(sampler)} sampler)" if sampler and sampler != method else "")
    text += f", keep {_fmt(c.get('selection_ratio'), '.0%')} of each pool, "
    return text + f"temperature τ = {_fmt(c.get('temperature'), 'g')}" + (
        "" if sampler == "gumbel" else " (used by the gumbel sampler only)")


def _cooldown_text(c: dict) -> str:
    frac = c.get("cooldown_fraction")
    if not _num(frac):
        return ""
    if not frac:
        return "; no lr-cooldown evaluation"
    return f"; at each stage end an lr cooldown over {_fmt(frac, '.0%')} of a stage's steps is evaluated"


def _config_rows(c: dict) -> list[list[str]]:
    lr = c.get("probe_lr")
    enc = {True: " (fine-tuned)", False: " (frozen)"}.get(c.get("train_encoder"), "")
    return [
        ["selection", _selection_text(c)],
        ["probing", f"{_fmt(c.get('probe_method'))}, {_fmt(c.get('num_probes'), ',d')} probes per stage, "
                    f"probe lr {'the current train lr' if lr is None else _fmt(lr, 'g')}"],
        ["influence model", f"encoder {_fmt(c.get('influence_encoder'))}{enc}, "
                            + ("ridge head, " if c.get("head_fit") == "ridge" and c.get("train_encoder") is False
                               else f"{_fmt(c.get('influence_epochs'), 'd')} epochs, ")
                            + f"chosen by {_fmt(c.get('cv_folds'), 'd')}-fold cross-validation"],
        ["budget", _budget_text(c)],
        ["tokens", f"{_fmt(c.get('batch_sequences'), 'd')} sequences × {_fmt(c.get('seq_tokens'), ',d')} "
                   f"tokens = {_fmt(c.get('tokens_per_step'), ',d')} tokens per step; "
                   f"{_fmt(c.get('total_tokens'), ',d')} in {_fmt(c.get('total_steps'), ',d')} steps"],
        ["seed", _fmt(c.get("seed"), "d")],
    ]


def config_table(view: dict) -> str:
    """The run's resolved config, one line per concern."""
    return _table(["setting", "value"], _config_rows(view.get("config") or {}), cls="config")


def _rel(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else elapsed_text(seconds)


HISTORY_CLASS = {"failed": "state-failed", "cancelled": "state-cancelled", "resumed": "state-resumed"}


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
        cool = next((st["cooldown"] for st in reversed(v["stages"]) if st.get("cooldown")), None) or {}
        return [label, html.escape(v["run_id"]), html.escape(v["status"]), _fmt(last.get("tokens"), ",d"),
                _fmt(last.get("heldout_loss")), _fmt(cool.get("loss"))]

    rows = [row("<b>this run</b>", view)]
    rows += [row(html.escape(str(a.get("label") or a["name"])), a) for a in arms]
    return _table(["arm", "run", "status", "tokens", "latest held-out loss", "after lr cooldown"], rows)


def run_body(view: dict, svgs: dict[str, str], arms: list[dict] | None = None) -> str:
    """The run's section: summary, config, history, stage table, and its charts (no <html>
    wrapper); `arms` are the other arms drawn on its loss chart."""
    final = next((s["heldout_loss"] for s in reversed(view["stages"]) if s["heldout_loss"] is not None), None)
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view["created_at"]))
    parts = [
        f'<h2>{html.escape(view["name"])} <span class="muted">{html.escape(view["run_id"])}</span></h2>',
        f'<p>status <b class="state-{html.escape(view["status"])}">{html.escape(view["status"])}</b>, '
        f'stage {_fmt(view["current_stage"], "d")}, elapsed {elapsed_text(view["elapsed_s"])}, '
        f'latest held-out loss {_fmt(final)}</p>',
    ]
    if view.get("error"):
        parts.append(f'<p class="state-failed">error: {html.escape(str(view["error"]))}</p>')
    parts += [f'<p class="sign" id="sign">{SIGN_TEXT}</p>',
              '<h3>Config</h3>', config_table(view),
              f'<h3>History <span class="muted">since {created}</span></h3>', history_list(view),
              '<h3>Stages</h3>', stage_table(view),
              '<h3>Loss against training tokens</h3>', f'<div class="chart" id="chart-loss">{svgs["loss"]}</div>']
    if arms:
        parts.append(arms_table(view, arms))
    parts += ['<h3>Stage timeline</h3>', f'<div class="chart" id="chart-timeline">{svgs["timeline"]}</div>']
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
        parts.append(f"<h3>Stage {k} → {k1}: probes at stage {k}'s checkpoint, "
                     f"stage {k1}'s pool scores and selection</h3>")
        parts.append(f"<p class=\"muted\">influence-model cross-validated Spearman "
                     f"{spearman_text(st['val_spearman'], st.get('val_n'), interval=st.get('cv_interval'))}; "
                     f"stage {k1}'s selection shares "
                     f"{_fmt(nxt['overlap_with_previous'], '.0%')} of its documents with stage {k}'s; "
                     f"lower influence / score = more helpful</p>")
        for name, key, svg in (("distribution", k, dist), ("domains", k1, dom)):
            if svg:
                parts.append(f'<div class="chart" id="chart-{name}-{key}">{svg}</div>')
    return parts


def page(title: str, body: str, head_extra: str = "") -> str:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style>{head_extra}</head>"
            f"<body>{body}</body></html>")


def render_report(view: dict, baseline: dict | None = None, arms: list[dict] | None = None) -> str:
    """The report page: the run with `baseline` (a full view, also reported below it) and
    `arms` (overlay views) drawn on its loss chart."""
    overlays = _overlays(baseline) + list(arms or [])
    body = [f"<h1>MATES run report: {html.escape(view['name'])}</h1>",
            run_body(view, charts(view, overlays), overlays)]
    if baseline:
        body += ["<hr>", "<h1>Baseline arm</h1>", run_body(baseline, charts(baseline))]
    body.append(f'<p class="muted">written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} '
                "by mates report</p>")
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
