"""The comparison chart: each arm's mean cooldown curve with its interval band, the A/A
spread shaded around random (comparison.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mates.artifacts import atomic_path
from mates.compare.arms import AA_ARM
from mates.stats import t_interval

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
