"""The comparison table: intervals, differences and censored ratios as text, one row per arm
(the CLI prints it, the report shows it)."""

from __future__ import annotations


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
