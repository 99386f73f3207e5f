"""A run's history as plain data, oldest first: its creation, every stage transition
(failures, cancellations and resumptions marked) and the events of events.jsonl, each
stage failure carrying the reason logged with it."""

from __future__ import annotations

from mates.manifest import StageState
from mates.report.text import is_number

ENDED_EARLY = (StageState.FAILED, StageState.CANCELLED)


def _transitions(m: dict) -> list[dict]:
    """Every stage's state changes but its initial `pending`. A stage leaving `failed` or
    `cancelled` for another state is a resumption."""
    rows = []
    for st in m["stages"]:
        prev = None
        for t in st.get("transitions") or []:
            state = str(t.get("state"))
            if prev is None and state == StageState.PENDING:
                prev = state
                continue  # every stage is created pending with the run
            kind = (
                "resumed"
                if prev in ENDED_EARLY
                else state
                if state in ENDED_EARLY
                else "transition"
            )
            rows.append(
                {
                    "at": t.get("at"),
                    "stage": st["stage"],
                    "what": state,
                    "kind": kind,
                    "from": prev,
                    "detail": t.get("error"),
                    "source": "stage",
                }
            )
            prev = state
    return rows


def _history(m: dict, events: list[dict]) -> list[dict]:
    """The run's history, oldest first: its creation, every stage transition, and the
    events logged in events.jsonl (failures with their reason, scorer waits, warnings)."""
    rows = [
        {
            "at": m["created_at"],
            "stage": None,
            "what": "run created",
            "kind": "run",
            "detail": None,
            "source": "run",
        },
        *_transitions(m),
    ]
    for e in events:
        what = str(e.get("event") or "event")
        rows.append(
            {
                "at": e.get("at"),
                "stage": e.get("stage"),
                "what": what,
                "kind": "failed" if what == "failed" else "event",
                "source": "event",
                "detail": e.get("reason") or e.get("message") or e.get("error"),
            }
        )
    rows = sorted((r for r in rows if is_number(r["at"])), key=lambda r: r["at"])
    return _merge_failures(rows, {st["stage"]: st.get("error") for st in m["stages"]})


def _is_stage_end(r: dict) -> bool:
    return r["source"] == "stage" and r["kind"] in ENDED_EARLY


def _merge_failures(rows: list[dict], stage_errors: dict) -> list[dict]:
    """A stage's `failed` transition takes the reason of the `failed` event logged with it
    (within a minute), which is then not listed twice; a stage failed now keeps its error."""
    used: set[int] = set()
    for r in filter(_is_stage_end, rows):
        i = next(
            (
                i
                for i, e in enumerate(rows)
                if i not in used
                and e["source"] == "event"
                and e["kind"] == "failed"
                and e["stage"] == r["stage"]
                and abs(e["at"] - r["at"]) < 60
            ),
            None,
        )
        if i is not None:
            used.add(i)
            r["detail"] = r["detail"] or rows[i]["detail"]
    latest = {r["stage"]: r for r in filter(_is_stage_end, rows)}
    for k, r in latest.items():
        r["detail"] = r["detail"] or stage_errors.get(k)
    return [r for i, r in enumerate(rows) if i not in used]
