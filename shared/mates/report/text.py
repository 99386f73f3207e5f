"""Formatting the numbers and settings the report's views and pages show."""

from __future__ import annotations

import html
from typing import Any


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    if is_number(v):
        try:
            return format(v, spec)
        except ValueError:  # a float where an int was expected
            return format(v, "g")
    return html.escape(str(v))


def budget_text(c: dict) -> str:
    steps = (
        f"{fmt(c.get('num_stages'), 'd')} stages: {fmt(c.get('stage0_steps'), ',d')} steps "
        f"in stage 0, {fmt(c.get('stage_steps'), ',d')} in each later one"
    )
    if c.get("stage_tokens") is not None:
        multiple = c.get("pool_multiple")
        pool = f"{fmt(multiple, 'g')}x" if multiple is not None else "1 / ratio times"
        budget = (
            f"token budgets of {fmt(c.get('stage0_tokens'), ',d')} (stage 0) and "
            f"{fmt(c.get('stage_tokens'), ',d')}, one epoch each; later pools {pool} the budget"
        )
    else:
        budget = f"{fmt(c.get('pool_docs'), ',d')} pool documents per stage"
    chunks = c.get("chunk_tokens")
    units = f"; documents cut into units of at most {fmt(chunks, ',d')} tokens" if chunks else ""
    return f"{steps}; {budget} ({fmt(c.get('pool_mode'))} pools){units}{cooldown_text(c)}"


def cooldown_text(c: dict) -> str:
    frac = c.get("cooldown_fraction")
    if not is_number(frac):
        return ""
    if not frac:
        return "; no lr-cooldown evaluation"
    return f"; at each stage end an lr cooldown over {fmt(frac, '.0%')} of a stage's steps is evaluated"
