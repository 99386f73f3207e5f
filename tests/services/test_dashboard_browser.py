"""The dashboard in a real browser: headless Chromium (the system's, driven by Playwright)
against a live API and a live scorer on loopback, both started and stopped by PID.

Skips, saying why, without the `playwright` package or a Chromium that starts. Playwright
never downloads a browser here: it drives `/usr/bin/chromium` (Debian's `chromium`), or
the binary named by `MATES_CHROMIUM`. Screenshots go to the test's tmp dir and to
`$MATES_TEST_ARTIFACTS` (default `runs/test-artifacts/`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from procs import free_port, mates_serve, wait_http
from test_dashboard import KEY, make_arm

from mates.artifacts import RunPaths, read_json
from services.common.store import Store

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DOCS = [
    "the market shares rose sharply after the report",
    "players won the match and thanked the fans",
    "the minister said the film star won the award",
]


def _chromium_path() -> str | None:
    named = os.environ.get("MATES_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as e:
        pytest.skip(
            f"browser tests skipped: the playwright package is not installed ({e}); "
            "pip install -e '.[dev]'"
        )
    exe = _chromium_path()
    if exe is None:
        pytest.skip(
            "browser tests skipped: no Chromium binary found (apt-get install chromium, "
            "or set MATES_CHROMIUM)"
        )
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"], timeout=30_000)
        except Error as e:
            pytest.skip(f"browser tests skipped: {exe} does not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[Path]:
    """Where screenshots go: a tmp dir, and the dir kept for people to look at."""
    keep = Path(os.environ.get("MATES_TEST_ARTIFACTS") or REPO / "runs" / "test-artifacts")
    try:
        keep.mkdir(parents=True, exist_ok=True)
    except OSError:
        keep = None
    return [tmp_path_factory.mktemp("screens"), *([keep] if keep else [])]


def screenshot(page, dirs: list[Path], name: str) -> None:
    page.screenshot(path=str(dirs[0] / name), full_page=True)
    for d in dirs[1:]:
        shutil.copy(dirs[0] / name, d / name)


@pytest.fixture(scope="module")
def live(tiny_run, tmp_path_factory):
    """The API (its store holding the tiny run), a second API over the same store with
    `MATES_READ_AUTH=1`, and the scorer, as `mates serve` processes started together."""
    base = tmp_path_factory.mktemp("live")
    run_dir = base / "tiny"
    run_dir.symlink_to(tiny_run["dir"], target_is_directory=True)
    db = f"sqlite:///{base}/runs.db"
    store = Store(db)
    manifest = read_json(RunPaths(run_dir).manifest)
    store.create_run(manifest, str(run_dir))

    api_port, keyed_port, scorer_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "MATES_API_KEY": KEY,
        "MATES_DATABASE_URL": db,
        "MATES_ARTIFACTS_DIR": str(base / "artifacts"),
        "MATES_API_PORT": str(api_port),
        "MATES_SCORER_URL": f"http://127.0.0.1:{scorer_port}",
        "OMP_NUM_THREADS": "1",
        "MATES_SCORER_PORT": str(scorer_port),
        "MATES_BROKER_URL": "redis://127.0.0.1:1/0",
    }
    keyed_env = {**env, "MATES_READ_AUTH": "1", "MATES_API_PORT": str(keyed_port)}
    scorer_env = {**env, "MATES_ARTIFACTS_DIR": str(tiny_run["dir"].parent)}
    (base / "keyed").mkdir()
    procs = [
        mates_serve("api", env, base),
        mates_serve("scorer", scorer_env, base),
        mates_serve("api", keyed_env, base / "keyed"),
    ]
    urls = [f"http://127.0.0.1:{p}" for p in (api_port, scorer_port, keyed_port)]
    try:
        for url in urls:
            wait_http(url + "/healthz", procs, timeout=60)
        yield {
            "url": urls[0],
            "keyed_url": urls[2],
            "run_id": manifest["run_id"],
            "store": store,
            "run_dir": run_dir,
            "base": base,
        }
    finally:
        for p in procs:
            p.stop()
        store.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"script errors in the page: {errors}"


def test_runs_list_shows_the_run_and_refreshes_itself(page, live, artifacts):
    page.goto(live["url"] + "/")
    row = page.locator(f'tr[data-run="{live["run_id"]}"]')
    assert "done" in row.inner_text()
    # a run that appears in the store after the page loaded shows up without a reload
    make_arm(live["run_dir"], live["base"] / "late", "late-00000001", "late", status="running")
    live["store"].create_run(
        read_json(RunPaths(live["base"] / "late").manifest), str(live["base"] / "late")
    )
    page.locator('tr[data-run="late-00000001"]').wait_for(timeout=15_000)
    assert "running" in page.locator('tr[data-run="late-00000001"]').inner_text()
    screenshot(page, artifacts, "dashboard-runs.png")


def test_run_page_charts_render(page, live, artifacts):
    page.goto(f"{live['url']}/runs/{live['run_id']}")
    charts = page.evaluate("""() => [...document.querySelectorAll('.chart')].map(c => {
        const svg = c.querySelector('svg'), box = svg ? svg.getBoundingClientRect() : null;
        return {id: c.id, paths: svg ? svg.querySelectorAll('path').length : 0,
                width: box ? box.width : 0, height: box ? box.height : 0};
    })""")
    n = len(read_json(RunPaths(live["run_dir"]).manifest)["stages"])
    assert len(charts) == 2 + 2 * (n - 1), charts  # loss, timeline, 2 per stage pair
    for c in charts:
        assert c["paths"] > 0 and c["width"] > 100 and c["height"] > 50, c
    screenshot(page, artifacts, "dashboard-run.png")


def test_score_form_shows_the_apis_scores(page, live, artifacts):
    page.goto(f"{live['url']}/runs/{live['run_id']}")
    assert page.input_value("#score-model") == f"{live['run_id']}/latest"
    page.fill("#api-key", KEY)
    page.fill("#score-docs", "\n".join(DOCS))
    page.click("#score-submit")
    page.locator(".score-row").nth(len(DOCS) - 1).wait_for(timeout=20_000)
    shown = page.eval_on_selector_all(
        ".score-row",
        "rows => rows.map(r => [r.cells[0].textContent, Number(r.cells[1].dataset.score)])",
    )
    body = {
        "model": f"{live['run_id']}/latest",
        "documents": [{"id": f"doc-{i + 1}", "text": t} for i, t in enumerate(DOCS)],
    }
    want = httpx.post(
        live["url"] + "/v1/score", json=body, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    assert shown == [[s["id"], s["score"]] for s in want]
    assert page.inner_text("#score-error") == ""
    page.locator("#score").scroll_into_view_if_needed()
    screenshot(page, artifacts, "dashboard-score.png")

    # an error from the API is shown as text: a wrong key
    page.fill("#api-key", "wrong-key")
    page.click("#score-submit")
    page.wait_for_function("document.getElementById('score-error').textContent.length > 0")
    assert "403" in page.inner_text("#score-error")


def test_with_read_auth_the_pages_open_with_the_key(page, live, artifacts):
    page.goto(live["keyed_url"] + "/")
    assert "API key required" in page.content() and live["run_id"] not in page.content()
    page.fill("#api-key", KEY)
    page.click("#unlock button")
    page.locator(f'tr[data-run="{live["run_id"]}"]').wait_for(timeout=10_000)
    screenshot(page, artifacts, "dashboard-unlocked.png")
    # a link is a plain navigation without the key: the page fetches itself with it
    page.click(f'a[href="/runs/{live["run_id"]}"]')
    page.locator("#chart-loss svg").wait_for(timeout=15_000)
    assert page.input_value("#api-key") == KEY
