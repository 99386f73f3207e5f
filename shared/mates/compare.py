"""Judging selection methods: arms × seeds, paired intervals, tokens and compute to match.

For each seed every arm shares the identical stage-0 checkpoint (the first arm trains it,
the others copy it), the same stage-1 pool and the same token budget; only the selection
differs. Arms are read at their cooldown evaluations (`Run._cooldown_eval`): the primary
held-out set's loss at each stage end after a short lr decay, so constant-lr noise does
not decide. The summary (comparison.json, schema in docs/comparison.md) holds per arm:
the final loss with a t-interval over seeds, the paired difference to `random` with a
t-interval over seeds and a bootstrap over held-out documents, tokens-to-match and
compute-to-match per seed (censored when never reached), and the compute ledger.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import numpy as np

from mates.artifacts import RunPaths, atomic_path, read_json, read_jsonl, write_json
from mates.config import RunConfig
from mates.data.corpus import iter_corpus
from mates.errors import ConfigError
from mates.run import Run
from mates.selection import target_label_mask
from mates.stats import (
    Interval,
    bootstrap_paired_difference,
    censored_summary,
    t_interval,
    tokens_to_match,
)

log = logging.getLogger(__name__)

SELECTION_PHASES = ("probe", "fit", "score", "select")
AA_ARM = "random-aa"


# --------------------------------------------------------------------------- arms


def arm_config(cfg: RunConfig, arm: str, seed: int) -> RunConfig:
    """The run config of one arm at one seed: the same everything, its own selection."""
    c = cfg.model_copy(deep=True)
    c.seed = seed
    c.name = f"{cfg.name}-s{seed}-{arm}"[:64]
    sel = c.selection
    if arm == "mates":
        sel.method = (
            cfg.selection.method if cfg.selection.method in ("mates", "gumbel", "topk") else "mates"
        )
    elif arm == AA_ARM:
        sel.method, sel.seed = "random", seed + cfg.compare.aa_seed_offset
    else:
        sel.method = arm
    if arm == "label":
        sel.target_labels = list(cfg.compare.target_labels or cfg.selection.target_labels)
    return c


def check_arms(cfg: RunConfig) -> None:
    """Refuse what cannot run, before any training starts."""
    arms = cfg.compare.arms
    if "label" in arms:
        d = cfg.data
        targets = cfg.compare.target_labels or cfg.selection.target_labels
        labels = (
            []
            if not targets or not d.domain_field
            else [
                r.domain
                for r in iter_corpus(
                    d.pool,
                    id_field=d.id_field,
                    text_field=d.text_field,
                    domain_field=d.domain_field,
                    on_bad_row=d.on_bad_row,
                )
            ]
        )
        target_label_mask(labels, targets, setting="`compare.target_labels`", field=d.domain_field)
    if len(arms) > 1 and "random" not in arms:
        raise ConfigError(
            f"`compare.arms` must include 'random', the baseline every arm is paired "
            f"with, got {arms}"
        )


def arm_dir(out_dir: Path, seed: int, arm: str) -> Path:
    return Path(out_dir) / f"seed-{seed}" / arm


def compare(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict:
    """Run every arm at every seed (resuming what exists) and write the comparison."""
    check_arms(cfg)
    out_dir = Path(out_dir)
    arms = sorted(cfg.compare.arms, key=lambda a: a != "random")  # random trains stage 0
    prepared: Path | None = None  # the first run's tokenizer and corpus serve every seed
    for seed in seeds_of(cfg):
        first: Path | None = None
        probed: Path | None = None  # the first model-based arm's stage-0 probes serve the others
        for arm in arms:
            where = arm_dir(out_dir, seed, arm)
            acfg = arm_config(cfg, arm, seed)
            run = Run(acfg, where, progress=progress)
            if run.manifest.data["status"] != "done":
                log.info("seed %d: running arm %s into %s", seed, arm, where)
                run.execute(seed_stage0_from=first, prepared_from=prepared, probes_from=probed)
            first = first or where
            prepared = prepared or where
            if probed is None and acfg.selection.model_based:
                probed = where
    summary = summarize(cfg, out_dir)
    write_json(out_dir / "comparison.json", summary)
    plot(summary, out_dir / "comparison.png")
    write_comparison_report(summary, out_dir / "comparison.png", out_dir / "report.html")
    return summary


def seeds_of(cfg: RunConfig) -> list[int]:
    return [cfg.seed + i for i in range(cfg.compare.seeds)]


# --------------------------------------------------------------------------- reading runs


def heldout_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(tokens, primary held-out loss) at every constant-lr evaluation, in training order."""
    rows = read_jsonl(RunPaths(Path(run_dir)).metrics)
    return [(int(r["tokens"]), float(r["heldout_loss"])) for r in rows]


def cooldown_points(run_dir: Path) -> list[dict]:
    """Each stage's cooldown evaluation, in stage order (stages without one are skipped)."""
    paths = RunPaths(Path(run_dir))
    m = read_json(paths.manifest)
    return [
        read_json(paths.cooldown(st["stage"]))
        for st in m["stages"]
        if paths.cooldown(st["stage"]).is_file()
    ]


def ledger(run_dir: Path) -> dict:
    """Per stage: analytic FLOPs and wall seconds by phase; totals; selection ÷ training."""
    m = read_json(RunPaths(Path(run_dir)).manifest)
    stages, totals, seconds = [], {}, {}
    for st in m["stages"]:
        flops = dict(st["metrics"].get("flops") or {})
        sel = sum(flops.get(p, 0.0) for p in SELECTION_PHASES)
        train = flops.get("train", 0.0)
        stages.append(
            {
                "stage": st["stage"],
                "flops": flops,
                "seconds": st["timings"],
                "tokens": st["metrics"].get("tokens"),
                "selection_over_training": round(sel / train, 6) if train else None,
            }
        )
        for phase, v in flops.items():
            totals[phase] = totals.get(phase, 0.0) + v
        for phase, v in st["timings"].items():
            seconds[phase] = round(seconds.get(phase, 0.0) + v, 3)
    sel = sum(totals.get(p, 0.0) for p in SELECTION_PHASES)
    return {
        "stages": stages,
        "flops": totals,
        "seconds": seconds,
        "selection_flops": sel,
        "training_flops": totals.get("train", 0.0),
        "selection_over_training": round(sel / totals["train"], 6) if totals.get("train") else None,
    }


def _compute_at(led: dict, tokens: float) -> float:
    """Training FLOPs to reach `tokens`, plus the selection FLOPs of every selection used by then."""
    total, prev_end = 0.0, 0
    for st in led["stages"]:
        end = st["tokens"] or 0
        train = st["flops"].get("train", 0.0)
        if tokens <= prev_end:
            break
        span = end - prev_end
        used = min(tokens, end) - prev_end
        total += train * used / span if span else 0.0
        if tokens > end:  # this stage's selection chose data trained on before `tokens`
            total += sum(st["flops"].get(p, 0.0) for p in SELECTION_PHASES)
        prev_end = end
    return total


# --------------------------------------------------------------------------- the summary


def summarize(cfg: RunConfig, out_dir: Path) -> dict:
    """The comparison over arms and seeds (the comparison.json document)."""
    cc = cfg.compare
    seeds = seeds_of(cfg)
    arms = sorted(cc.arms, key=lambda a: a != "random")
    runs = {a: {s: _read_arm(arm_dir(out_dir, s, a)) for s in seeds} for a in arms}
    primary = cfg.data.primary
    summary = {
        "schema": "mates.comparison/1",
        "name": cfg.name,
        "arms": arms,
        "seeds": seeds,
        "primary_heldout": primary,
        "heldout_sets": [h.name for h in cfg.data.heldout_specs()],
        "confidence": cc.confidence,
        "runs": {a: {str(s): runs[a][s]["view"] for s in seeds} for a in arms},
        "summary": {},
    }
    for a in arms:
        summary["summary"][a] = _arm_summary(a, runs, seeds, primary, cc)
    if AA_ARM in arms and "random" in arms:
        aa = summary["summary"][AA_ARM]["difference_to_random"]
        summary["aa_spread"] = {"final": aa["final"], "by_stage": aa["by_stage"]}
    return summary


def _read_arm(run_dir: Path) -> dict:
    points = cooldown_points(run_dir)
    led = ledger(run_dir)
    view = {
        "run_dir": str(run_dir),
        "curve": [{"tokens": t, "heldout_loss": v} for t, v in heldout_curve(run_dir)],
        "cooldown": [
            {
                "stage": p["stage"],
                "tokens": p["tokens"],
                "primary": p["primary"],
                **{
                    name: {k: v for k, v in s.items() if k not in ("doc_sums", "doc_counts")}
                    for name, s in p["sets"].items()
                },
            }
            for p in points
        ],
        "ledger": led,
    }
    return {"view": view, "points": points, "ledger": led}


def _final_sets(arm: dict) -> dict:
    return arm["points"][-1]["sets"]


def _interval(values: list[float], cc) -> dict:
    """Mean with a t-interval over seeds (just the mean when intervals are off)."""
    if cc.intervals and len(values) >= 2:
        return t_interval(values, cc.confidence).as_dict()
    return {
        "estimate": round(float(np.mean(values)), 6),
        "low": None,
        "high": None,
        "n": len(values),
    }


def _arm_summary(arm: str, runs: dict, seeds: list[int], primary: str, cc) -> dict:
    mine = runs[arm]
    finals = {
        name: [_final_sets(mine[s])[name]["loss"] for s in seeds]
        for name in _final_sets(mine[seeds[0]])
    }
    out = {
        "final": {name: _interval(v, cc) for name, v in finals.items()},
        "final_accuracy": {
            name: _interval([_final_sets(mine[s])[name]["accuracy"] for s in seeds], cc)
            for name, st in _final_sets(mine[seeds[0]]).items()
            if st.get("accuracy") is not None
        },
        "selection_over_training": _interval(
            [mine[s]["ledger"]["selection_over_training"] or 0.0 for s in seeds], cc
        ),
        "seconds": {str(s): mine[s]["ledger"]["seconds"] for s in seeds},
    }
    if "random" not in runs:
        return out
    base = runs["random"]
    by_stage = []
    for j in range(len(mine[seeds[0]]["points"])):
        diffs = [
            mine[s]["points"][j]["sets"][primary]["loss"]
            - base[s]["points"][j]["sets"][primary]["loss"]
            for s in seeds
        ]
        by_stage.append(
            {
                "stage": mine[seeds[0]]["points"][j]["stage"],
                "tokens": mine[seeds[0]]["points"][j]["tokens"],
                **_interval(diffs, cc),
                "per_seed": [round(d, 6) for d in diffs],
            }
        )
    sums_a = np.array([_final_sets(mine[s])[primary]["doc_sums"] for s in seeds])
    sums_b = np.array([_final_sets(base[s])[primary]["doc_sums"] for s in seeds])
    counts = np.array([_final_sets(mine[s])[primary]["doc_counts"] for s in seeds])
    boot: Interval = bootstrap_paired_difference(
        sums_a, sums_b, counts, n_boot=cc.bootstrap, confidence=cc.confidence, seed=0
    )
    out["difference_to_random"] = {
        "final": by_stage[-1],
        "bootstrap_documents": boot.as_dict(),
        "by_stage": by_stage,
    }
    out.update(_to_match(mine, base, seeds, primary))
    return out


def _to_match(mine: dict, base: dict, seeds: list[int], primary: str) -> dict:
    """Tokens and compute the arm needs to reach random's final loss, per seed.

    Searched on cooldown points after the shared stage 0 only; None (censored) when never
    reached within the budget."""
    tokens_ratio, compute_ratio, per_seed = [], [], []
    for s in seeds:
        pts = [(p["tokens"], p["sets"][primary]["loss"]) for p in mine[s]["points"]]
        target = base[s]["points"][-1]["sets"][primary]["loss"]
        budget = base[s]["points"][-1]["tokens"]
        reach = tokens_to_match(pts, target, start_tokens=pts[0][0])
        random_train = base[s]["ledger"]["training_flops"]
        t_ratio = None if reach is None else reach / budget
        c_ratio = None if reach is None else _compute_at(mine[s]["ledger"], reach) / random_train
        tokens_ratio.append(t_ratio)
        compute_ratio.append(c_ratio)
        per_seed.append(
            {
                "seed": s,
                "target": target,
                "tokens": reach,
                "tokens_ratio": None if t_ratio is None else round(t_ratio, 4),
                "compute_ratio": None if c_ratio is None else round(c_ratio, 4),
            }
        )
    return {
        "tokens_to_match": censored_summary(tokens_ratio),
        "compute_to_match": censored_summary(compute_ratio),
        "to_match_per_seed": per_seed,
    }


# --------------------------------------------------------------------------- table, chart, report


def _pm(iv: dict, spec: str = ".4f") -> str:
    est = format(iv["estimate"], spec)
    if iv.get("low") is None:
        return est
    return f"{est} ± {format((iv['high'] - iv['low']) / 2, spec)}"


def _range(iv: dict) -> str:
    if iv.get("low") is None:
        return format(iv["estimate"], "+.4f")
    return f"{iv['estimate']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"


def _censored(c: dict) -> str:
    def f(v):
        return "never" if v is None else f"{v:.3f}"

    if c["n"] == 0:
        return "-"
    if c["censored"] == c["n"]:
        return f"never (0/{c['n']})"
    return f"{f(c['median'])} [{f(c['min'])}, {f(c['max'])}]" + (
        f" ({c['censored']}/{c['n']} never)" if c["censored"] else ""
    )


def table_rows(summary: dict) -> list[list[str]]:
    """The comparison table: a header and one row per arm (the CLI prints it, the report shows it)."""
    primary = summary["primary_heldout"]
    head = [
        "arm",
        f"final {primary} (mean ± CI)",
        "Δ vs random [CI over seeds]",
        "Δ bootstrap docs",
        "tokens-to-match",
        "compute-to-match",
        "selection/training FLOPs",
    ]
    rows = [head]
    for arm in summary["arms"]:
        s = summary["summary"][arm]
        d = s.get("difference_to_random")
        is_base = arm == "random"
        rows.append(
            [
                arm,
                _pm(s["final"][primary]),
                "-" if is_base or d is None else _range(d["final"]),
                "-" if is_base or d is None else _range(d["bootstrap_documents"]),
                "-" if is_base or "tokens_to_match" not in s else _censored(s["tokens_to_match"]),
                "-" if is_base or "compute_to_match" not in s else _censored(s["compute_to_match"]),
                f"{s['selection_over_training']['estimate']:.3f}",
            ]
        )
    return rows


def format_table(summary: dict) -> str:
    rows = table_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    aa = summary.get("aa_spread")
    if aa:
        lines.append(
            f"A/A spread (random-aa − random, final): {_range(aa['final'])}: "
            "a gap inside it is no evidence"
        )
    return "\n".join(lines)


_COLORS = {
    "random": "tab:gray",
    "mates": "tab:blue",
    "static": "tab:orange",
    "dsir": "tab:green",
    "perplexity": "tab:purple",
    "label": "tab:brown",
    AA_ARM: "silver",
}


def plot(summary: dict, out: Path) -> None:
    """Mean cooldown curve per arm with its CI band; the A/A band around random shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = summary["primary_heldout"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for arm in summary["arms"]:
        per_seed = [
            [p[primary]["loss"] for p in v["cooldown"]] for v in summary["runs"][arm].values()
        ]
        tokens = [p["tokens"] / 1e6 for p in next(iter(summary["runs"][arm].values()))["cooldown"]]
        y = np.array(per_seed)  # (seeds, stages)
        mean = y.mean(axis=0)
        ax.plot(
            tokens, mean, "-o", ms=3, color=_COLORS.get(arm), label=f"{arm} (final {mean[-1]:.3f})"
        )
        if y.shape[0] >= 2:
            ivs = [t_interval(y[:, j], summary["confidence"]) for j in range(y.shape[1])]
            ax.fill_between(
                tokens,
                [i.low for i in ivs],
                [i.high for i in ivs],
                color=_COLORS.get(arm),
                alpha=0.08,
            )
        if arm == "random" and summary.get("aa_spread"):
            band = summary["aa_spread"]["by_stage"]
            if band and band[0].get("low") is not None:
                ax.fill_between(
                    tokens,
                    mean + [b["low"] for b in band],
                    mean + [b["high"] for b in band],
                    color="gray",
                    alpha=0.25,
                    hatch="//",
                    label="A/A spread around random",
                )
    ax.set_xlabel("training tokens (millions), evaluated after an lr cooldown at each stage end")
    ax.set_ylabel(f"held-out loss ({primary})")
    ax.set_title("Selection methods: mean over seeds with 95% intervals")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


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
