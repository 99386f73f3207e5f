"""The web dashboard: the runs list and a page per run, served as plain HTML.

The charts are SVG drawn on the server by `mates.report` (matplotlib), so the pages need
nothing from another host. The pages are Jinja templates (`services/api/templates/`,
autoescaped); their CSS and scripts are static files (`services/api/static/`, at
`/static`): the scripts refresh the runs table and an unfinished run's section, and send
the score form to `POST /v1/score`.

With `MATES_READ_AUTH` a page, like the JSON reads, needs the bearer key: a browser cannot
send one on a navigation, so a request without it gets a locked page (401, no data) whose
script asks for the key, keeps it in the tab's sessionStorage and fetches the page again
with it. Everything user-controlled (run names, errors) is escaped on the server, and the
script writes what it receives as text, never as markup, except the server's own HTML.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from mates import report
from mates.artifacts import RunPaths
from mates.errors import MatesError
from mates.manifest import RunStatus
from services.api.deps import RunId, SettingsDep, StoreDep
from services.api.routes.runs import read_log
from services.common.auth import check_key
from services.common.contracts import FINAL, RUN_ID_PATTERN, random_baseline_name, stages_done
from services.common.store import Store
from services.common.store.records import RunDetail

router = APIRouter(include_in_schema=False)

RUNS_SHOWN = 200  # newest first; older ones stay reachable through the JSON API
REFRESH_MS = 3000
_CHARTS = threading.Lock()  # pyplot keeps global state; routes run in a thread pool

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")  # autoescaped
STATIC = Path(__file__).parent.parent / "static"
"""The dashboard's CSS and scripts, served at /static (they hold no data)."""


# --------------------------------------------------------------------------- page shell


def _page(
    request: Request, template: str, title: str, code: int = 200, **context: Any
) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(
        request,
        template,
        {"title": title, "report_css": Markup(report.CSS), "refresh_ms": REFRESH_MS, **context},
        status_code=code,
        # Never cached: pages change as runs progress, and with read auth they hold keyed data.
        headers={"Cache-Control": "no-store", "Vary": "Authorization"},
    )


def _locked(request: Request, settings) -> HTMLResponse | None:
    """The locked page when reads need the key and the request lacks the right one (the
    bearer key is read as the API's read dependency reads it)."""
    if not settings.read_auth:
        return None
    try:
        check_key(request.headers.get("authorization"), settings)
    except HTTPException as e:
        return _page(request, "locked.html", "API key required", e.status_code)
    return None


def _not_found(request: Request, what: str) -> HTMLResponse:
    return _page(
        request, "message.html", "Not found", status.HTTP_404_NOT_FOUND, message=what, home=True
    )


# --------------------------------------------------------------------------- runs list


# metrics log path -> ((mtime_ns, size), latest held-out loss): the runs list refreshes
# every few seconds, and only a log that changed since is read again
_LATEST_LOSS: dict[Path, tuple[tuple[int, int], float | None]] = {}
_LATEST_LOSS_MAX = 4 * RUNS_SHOWN


def _latest_loss(artifacts_dir: str) -> float | None:
    """The last held-out loss in the run's metrics log: the loss so far, mid-stage too."""
    path = RunPaths(Path(artifacts_dir)).metrics
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = _LATEST_LOSS.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        rows = read_log(path)
    except (MatesError, OSError):
        return None
    loss = next(
        (r["heldout_loss"] for r in reversed(rows) if r.get("heldout_loss") is not None), None
    )
    if len(_LATEST_LOSS) >= _LATEST_LOSS_MAX:
        _LATEST_LOSS.clear()
    _LATEST_LOSS[path] = (stamp, loss)
    return loss


def _rows(store: Store) -> list[dict[str, Any]]:
    """The runs table's rows: each run with its elapsed time and latest held-out loss."""
    now = time.time()
    out = []
    for run in store.list_runs(limit=RUNS_SHOWN):
        end = run["updated_at"] if run["status"] in FINAL else now
        out.append(
            {
                **run,
                "loss": _latest_loss(run["artifacts_dir"]),
                "elapsed": report.elapsed_text(max(0.0, end - run["created_at"])),
                "stages_done": stages_done(run["current_stage"], run.get("stage_state")),
            }
        )
    return out


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    if locked := _locked(request, settings):
        return locked
    return _page(request, "runs.html", "MATES runs", runs=_rows(store), shown=RUNS_SHOWN)


@router.get("/dashboard/rows", response_class=HTMLResponse)
def runs_rows(request: Request, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    """The runs table's rows alone, for the list's refresh."""
    if _locked(request, settings):
        return HTMLResponse("", status_code=status.HTTP_401_UNAUTHORIZED)
    return TEMPLATES.TemplateResponse(
        request, "rows.html", {"runs": _rows(store)}, headers={"Cache-Control": "no-store"}
    )


# --------------------------------------------------------------------------- a run


def find_arms(store: Store, run: RunDetail) -> list[tuple[str | None, Path]]:
    """The other arms of the comparison the run belongs to, as (label, run dir): every
    sibling arm of `mates compare`'s `DIR/seed-<s>/<arm>/` (labelled by its folder), or the
    `random/` beside a `<dir>/mates`, else the newest run in the store named
    `<name>-random` (`contracts.random_baseline_name`: a random run submitted beside it;
    labelled by its run name)."""
    here = Path(run["artifacts_dir"])
    siblings = report.sibling_arms(here)
    if siblings:
        return [(p.name, p) for p in siblings]
    if (run.get("config") or {}).get("selection", {}).get("method") == "random":
        return []  # the run is a random arm itself
    want = random_baseline_name(run["name"])
    arms = [r for r in store.list_runs(limit=500) if r["name"] == want and r["id"] != run["id"]]
    done = [r for r in arms if r["status"] == RunStatus.DONE]
    pick = (done or arms)[:1]
    return [(None, Path(r["artifacts_dir"])) for r in pick]


def find_baseline(store: Store, run: RunDetail) -> Path | None:
    """The first of `find_arms` (the random arm where there is one)."""
    arms = find_arms(store, run)
    return arms[0][1] if arms else None


def _overlay_views(pairs: list[tuple[str | None, Path]]) -> list[dict[str, Any]]:
    """The arms' curves; an arm found beside the run whose artifacts cannot be read is
    left out rather than failing the run's page."""
    out = []
    for label, path in pairs:
        try:
            out.append(report.overlay_view(path, label))
        except (MatesError, OSError, KeyError, ValueError, TypeError):
            continue
    return out


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    run_id: RunId,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    baseline: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None,
) -> HTMLResponse:
    if locked := _locked(request, settings):
        return locked
    run = store.get_run(run_id)
    if run is None:
        return _not_found(request, f"no run {run_id!r}")
    if baseline is not None:
        other = store.get_run(baseline)
        if other is None:
            return _not_found(request, f"no baseline run {baseline!r}")
        pairs: list[tuple[str | None, Path]] = [(None, Path(other["artifacts_dir"]))]
    else:
        pairs = find_arms(store, run)
    try:
        view = report.run_view(Path(run["artifacts_dir"]))
        arms = _overlay_views(pairs) if baseline is None else [report.overlay_view(pairs[0][1])]
        with _CHARTS:
            svgs = report.charts(view, arms)
    except (MatesError, OSError) as e:
        return _page(
            request,
            "message.html",
            run_id,
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            message=f"cannot read the run's artifacts: {e}",
        )
    # which runs the dashed curves are, linked where the store knows them
    notes = [
        {
            "label": str(a["label"]),
            "run_id": a["run_id"],
            "known": store.get_run(a["run_id"]) is not None,
        }
        for a in arms
    ]
    return _page(
        request,
        "run.html",
        f"{view['name']} ({run_id})",
        status=view["status"],
        arms=notes,
        chosen=baseline is not None,
        body_html=Markup(report.run_body(view, svgs, arms)),  # the library escapes its own
        default_model=f"{run_id}/latest",
        versions=[m["version"] for m in store.list_models(run_id)],
    )


@router.get("/score", response_class=HTMLResponse)
def score_page(request: Request, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    if locked := _locked(request, settings):
        return locked
    versions = [m["version"] for m in store.list_models()]
    default = f"{versions[0].split('/')[0]}/latest" if versions else ""
    return _page(request, "score.html", "Score documents", default_model=default, versions=versions)
