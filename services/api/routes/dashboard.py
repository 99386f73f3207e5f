"""The web dashboard: the runs list and a page per run, served as plain HTML.

The charts are SVG drawn on the server by `mates.report` (matplotlib), so the pages need
nothing from another host. The only script is inline: it refreshes the runs table and an
unfinished run's section, and sends the score form to `POST /v1/score`.

With `MATES_READ_AUTH` a page, like the JSON reads, needs the bearer key: a browser cannot
send one on a navigation, so a request without it gets a locked page (401, no data) whose
script asks for the key, keeps it in the tab's sessionStorage and fetches the page again
with it. Everything user-controlled (run names, errors) is escaped on the server, and the
script writes what it receives as text, never as markup, except the server's own HTML.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import HTMLResponse

from mates import report
from mates.artifacts import RunPaths
from mates.errors import MatesError
from services.api.deps import RunId, SettingsDep, StoreDep
from services.api.routes.runs import read_log
from services.common.auth import key_matches
from services.common.contracts import FINAL, RUN_ID_PATTERN, random_baseline_name
from services.common.store import Store

router = APIRouter(include_in_schema=False)

RUNS_SHOWN = 200  # newest first; older ones stay reachable through the JSON API
REFRESH_MS = 3000
_CHARTS = threading.Lock()  # pyplot keeps global state; routes run in a thread pool

STYLE = """<style>
nav { display: flex; gap: 1rem; align-items: baseline; border-bottom: 1px solid #ddd;
      padding-bottom: .5rem; margin-bottom: 1rem; }
nav .key { margin-left: auto; font-size: .85rem; }
input, textarea, select, button { font: inherit; font-size: .9rem; }
textarea { width: 100%; box-sizing: border-box; }
.error { color: #b00020; white-space: pre-wrap; }
td.doc, th.doc { text-align: left; max-width: 36rem; overflow: hidden; text-overflow: ellipsis;
         white-space: nowrap; }
.notice { background: #f4f6fa; border-left: 3px solid #4c78a8; padding: .4rem .7rem; }
</style>"""

# Shared by every page: the key field, and `authed(url, opts)` which fetches with the key.
COMMON_JS = """
const KEY = 'mates-api-key';
const keyInput = document.getElementById('api-key');
keyInput.value = sessionStorage.getItem(KEY) || '';
for (const ev of ['input', 'change']) {
  keyInput.addEventListener(ev, () => sessionStorage.setItem(KEY, keyInput.value.trim()));
}
function authed(url, opts = {}) {
  const k = sessionStorage.getItem(KEY);
  const headers = Object.assign({}, opts.headers || {}, k ? {Authorization: 'Bearer ' + k} : {});
  return fetch(url, Object.assign({}, opts, {headers, cache: 'no-store'}));
}
function problem(status, body) {
  const d = body && body.detail;
  return 'HTTP ' + status + ': ' + (typeof d === 'string' ? d : JSON.stringify(d || body));
}
"""

# The runs table's body is fetched again as the server renders it (escaping in one place).
LIST_JS = """
async function refreshRuns() {
  try {
    const r = await authed('/dashboard/rows');
    if (r.ok) { document.getElementById('runs-body').innerHTML = await r.text();
                document.getElementById('refreshed').textContent = new Date().toLocaleTimeString(); }
  } catch (e) { /* the API is restarting: try again next time */ }
}
setInterval(refreshRuns, %(ms)d);
"""

# An unfinished run's section is swapped for a fresh one until the run ends; the score
# form below it keeps what was typed.
RUN_JS = """
async function refreshRun() {
  const section = document.getElementById('run');
  if (['done', 'failed', 'cancelled'].includes(section.dataset.status)) return;
  try {
    const r = await authed(location.href);
    if (r.ok) {
      const fresh = new DOMParser().parseFromString(await r.text(), 'text/html').getElementById('run');
      if (fresh) { section.replaceWith(fresh); }
    }
  } catch (e) { /* try again next time */ }
  setTimeout(refreshRun, %(ms)d);
}
setTimeout(refreshRun, %(ms)d);
"""

SCORE_JS = """
document.getElementById('score-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const out = document.getElementById('score-out'), err = document.getElementById('score-error');
  out.replaceChildren(); err.textContent = '';
  document.getElementById('score-version').textContent = '';
  const raw = document.getElementById('score-docs').value.trim();
  let docs;
  if (raw.startsWith('[')) {
    try { docs = JSON.parse(raw); } catch (e) { err.textContent = 'not valid JSON: ' + e.message; return; }
    docs = docs.map((d, i) => typeof d === 'string' ? {id: 'doc-' + (i + 1), text: d} : d);
  } else {
    docs = raw.split('\\n').map(s => s.trim()).filter(s => s)
              .map((text, i) => ({id: 'doc-' + (i + 1), text}));
  }
  if (!docs.length) { err.textContent = 'enter at least one document'; return; }
  const model = document.getElementById('score-model').value.trim();
  let r, body;
  try {
    r = await authed('/v1/score', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                   body: JSON.stringify({model, documents: docs})});
    body = await r.json().catch(() => null);
  } catch (e) { err.textContent = 'the API cannot be reached: ' + e.message; return; }
  if (!r.ok) { err.textContent = problem(r.status, body); return; }
  const version = r.headers.get('X-Model-Version') || model;
  document.getElementById('score-version').textContent =
    'scored by ' + version + ' (influence-model output in z-units; lower is more helpful)';
  const head = document.createElement('tr');
  for (const h of ['id', 'score', 'document']) {
    const th = document.createElement('th'); th.textContent = h; th.className = h === 'document' ? 'doc' : '';
    head.append(th);
  }
  out.append(head);
  const texts = new Map(docs.map(d => [d.id, d.text]));
  for (const s of body) {
    const tr = document.createElement('tr'); tr.className = 'score-row';
    const id = document.createElement('td'); id.textContent = s.id;
    const sc = document.createElement('td'); sc.textContent = s.score.toFixed(4); sc.dataset.score = s.score;
    const doc = document.createElement('td'); doc.className = 'doc'; doc.textContent = texts.get(s.id) || '';
    tr.append(id, sc, doc); out.append(tr);
  }
});
"""

LOCKED_JS = """
const msg = document.getElementById('locked-msg');
async function unlock() {
  if (!sessionStorage.getItem(KEY)) return;
  const r = await authed(location.href);
  if (r.ok) { const page = await r.text(); document.open(); document.write(page); document.close(); }
  else { msg.textContent = r.status === 403 ? 'that key was refused' : 'HTTP ' + r.status; }
}
document.getElementById('unlock').addEventListener('submit', (ev) => {
  ev.preventDefault(); sessionStorage.setItem(KEY, keyInput.value.trim()); unlock();
});
unlock();
"""


# --------------------------------------------------------------------------- page shell


def _nav(title: str) -> str:
    return ('<nav><a href="/">Runs</a><a href="/score">Score documents</a>'
            f'<strong>{html.escape(title)}</strong>'
            '<label class="key">API key <input id="api-key" type="password" size="18" '
            'autocomplete="off" placeholder="kept in this tab"></label></nav>')


def _page(title: str, body: str, script: str = "", code: int = 200) -> HTMLResponse:
    # One function scope per page: the locked page writes the real one over itself, and a
    # second top-level `const KEY` in the same window would be a SyntaxError.
    text = report.page(title, _nav(title) + body + f"<script>(() => {{{COMMON_JS}{script}}})();"
                       "</script>", head_extra=STYLE)
    # Never cached: pages change as runs progress, and with read auth they hold keyed data.
    return HTMLResponse(text, status_code=code,
                        headers={"Cache-Control": "no-store", "Vary": "Authorization"})


def _locked(request: Request, settings) -> HTMLResponse | None:
    """The locked page when reads need the key and the request lacks the right one."""
    if not settings.read_auth:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key_matches(token.strip(), settings.api_key):
        return None
    code = status.HTTP_403_FORBIDDEN if token else status.HTTP_401_UNAUTHORIZED
    body = ('<p class="notice">This server requires the API key to read runs '
            '(<code>MATES_READ_AUTH</code>). Enter it to see this page; it is kept in this '
            'tab only (sessionStorage) and sent as a bearer key.</p>'
            '<form id="unlock"><button>Show the page</button></form>'
            '<p id="locked-msg" class="error"></p>')
    return _page("API key required", body, LOCKED_JS, code)


def _not_found(what: str) -> HTMLResponse:
    return _page("Not found", f'<p class="error">{html.escape(what)}</p><p><a href="/">All runs</a></p>',
                 code=status.HTTP_404_NOT_FOUND)


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
    loss = next((r["heldout_loss"] for r in reversed(rows) if r.get("heldout_loss") is not None), None)
    if len(_LATEST_LOSS) >= _LATEST_LOSS_MAX:
        _LATEST_LOSS.clear()
    _LATEST_LOSS[path] = (stamp, loss)
    return loss


def _row(run: dict[str, Any], now: float) -> str:
    end = run["updated_at"] if run["status"] in FINAL else now
    loss = _latest_loss(run["artifacts_dir"])
    rid, state = html.escape(run["id"]), html.escape(run["stage_state"] or "–")
    cells = [html.escape(run["name"]), f'<a href="/runs/{rid}">{rid}</a>',
             f'<span class="state-{html.escape(run["status"])}">{html.escape(run["status"])}</span>',
             f'{run["current_stage"]} ({state}) <span class="muted">of 0–{run["num_stages"] - 1}</span>',
             report.elapsed_text(max(0.0, end - run["created_at"])), "–" if loss is None else f"{loss:.3f}"]
    return f'<tr data-run="{rid}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _rows(store: Store) -> str:
    runs = store.list_runs(limit=RUNS_SHOWN)
    if not runs:
        return '<tr><td colspan="6" class="muted">no runs in the store yet</td></tr>'
    now = time.time()
    return "".join(_row(r, now) for r in runs)


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    if locked := _locked(request, settings):
        return locked
    head = "".join(f"<th>{h}</th>" for h in ("name", "run", "status", "stage", "elapsed",
                                             "held-out loss"))
    body = (f'<table id="runs"><thead><tr>{head}</tr></thead>'
            f'<tbody id="runs-body">{_rows(store)}</tbody></table>'
            f'<p class="muted">newest {RUNS_SHOWN} runs; refreshed every {REFRESH_MS // 1000} s, '
            'last at <span id="refreshed">page load</span></p>')
    return _page("MATES runs", body, LIST_JS % {"ms": REFRESH_MS})


@router.get("/dashboard/rows", response_class=HTMLResponse)
def runs_rows(request: Request, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    """The runs table's rows alone, for the list's refresh."""
    if _locked(request, settings):
        return HTMLResponse("", status_code=status.HTTP_401_UNAUTHORIZED)
    return HTMLResponse(_rows(store), headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- a run


def find_arms(store: Store, run: dict[str, Any]) -> list[tuple[str | None, Path]]:
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
    done = [r for r in arms if r["status"] == "done"]
    pick = (done or arms or [None])[0]
    return [(None, Path(pick["artifacts_dir"]))] if pick else []


def find_baseline(store: Store, run: dict[str, Any]) -> Path | None:
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


def _arms_note(store: Store, arms: list[dict[str, Any]], chosen: bool) -> str:
    """Which runs the dashed curves are, linked where the store knows them."""
    if not arms:
        return ""
    links = []
    for a in arms:
        label, rid = html.escape(str(a["label"])), html.escape(a["run_id"])
        links.append(f'<a href="/runs/{rid}">{label}</a> <span class="muted">{rid}</span>'
                     if store.get_run(a["run_id"]) else f'{label} <span class="muted">{rid}</span>')
    how = "chosen with ?baseline=" if chosen else "found as this run&#x27;s comparison arms"
    return (f'<p class="notice" id="baseline">dashed: held-out loss of {", ".join(links)} '
            f'({how})</p>')


def _score_form(default_model: str, versions: list[str]) -> str:
    options = "".join(f'<option value="{html.escape(v)}">' for v in versions)
    return ('<h3 id="score">Score documents</h3>'
            '<form id="score-form"><p><label>model version <input id="score-model" size="40" '
            f'list="versions" value="{html.escape(default_model)}" '
            'placeholder="RUN_ID/latest or RUN_ID/STAGE"></label>'
            f'<datalist id="versions">{options}</datalist></p>'
            '<p><textarea id="score-docs" rows="6" placeholder="one document per line, or a '
            'JSON list of {&quot;id&quot;, &quot;text&quot;}"></textarea></p>'
            '<p><button id="score-submit">Score</button> <span class="muted">POST /v1/score '
            'with the API key above</span></p></form>'
            '<p id="score-error" class="error"></p><p id="score-version" class="muted"></p>'
            '<table id="score-out"></table>')


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: RunId, request: Request, store: StoreDep, settings: SettingsDep,
             baseline: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None,
             ) -> HTMLResponse:
    if locked := _locked(request, settings):
        return locked
    run = store.get_run(run_id)
    if run is None:
        return _not_found(f"no run {run_id!r}")
    if baseline is not None:
        other = store.get_run(baseline)
        if other is None:
            return _not_found(f"no baseline run {baseline!r}")
        pairs: list[tuple[str | None, Path]] = [(None, Path(other["artifacts_dir"]))]
    else:
        pairs = find_arms(store, run)
    try:
        view = report.run_view(Path(run["artifacts_dir"]))
        arms = _overlay_views(pairs) if baseline is None else [report.overlay_view(pairs[0][1])]
        with _CHARTS:
            svgs = report.charts(view, arms)
    except (MatesError, OSError) as e:
        return _page(run_id, f'<p class="error">cannot read the run\'s artifacts: '
                     f'{html.escape(str(e))}</p>', code=status.HTTP_500_INTERNAL_SERVER_ERROR)
    section = (f'<section id="run" data-status="{html.escape(view["status"])}">'
               f'{_arms_note(store, arms, baseline is not None)}'
               f'{report.run_body(view, svgs, arms)}</section>')
    versions = [m["version"] for m in store.list_models(run_id)]
    body = section + _score_form(f"{run_id}/latest", versions)
    return _page(f"{view['name']} ({run_id})", body, RUN_JS % {"ms": REFRESH_MS} + SCORE_JS)


@router.get("/score", response_class=HTMLResponse)
def score_page(request: Request, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    if locked := _locked(request, settings):
        return locked
    versions = [m["version"] for m in store.list_models()]
    default = f"{versions[0].split('/')[0]}/latest" if versions else ""
    return _page("Score documents", _score_form(default, versions), SCORE_JS)
