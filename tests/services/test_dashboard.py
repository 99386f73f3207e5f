"""The web dashboard in process (TestClient): the runs list, a run's page with its charts
and baseline overlay, escaping, read auth, and the pages kept out of the OpenAPI schema.

The browser side (scripts, live refresh, the score form) is `test_dashboard_browser.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from procs import free_port

from mates.artifacts import RunPaths, read_json, write_json
from services.api.app import create_app
from services.common.settings import Settings

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
EVIL = "<script>alert(1)</script>"


def assert_only_local_resources(client, page: str) -> None:
    """Every script, stylesheet and image of the page is one of this server's /static
    files (served, with no host named), so the dashboard works offline."""
    found = re.findall(r"<(?:script|link|img)\b[^>]*?(?:src|href)=\"([^\"]*)\"", page)
    assert found, "the page loads its CSS and scripts from /static"
    for url in found:
        assert url.startswith("/static/"), url
        assert client.get(url).status_code == 200, url


def dashboard_settings(tmp_path: Path, **over) -> Settings:
    """No broker is ever contacted: the pages only read the store and the artifacts."""
    values = {
        "api_key": KEY,
        "database_url": f"sqlite:///{tmp_path}/db/runs.db",
        "artifacts_dir": tmp_path / "artifacts",
        "broker_url": "redis://127.0.0.1:1/0",
        "scorer_url": f"http://127.0.0.1:{free_port()}",
        "http_timeout_s": 5.0,
    }
    return Settings(**{**values, **over})


def register(client: TestClient, run_dir: Path) -> str:
    m = read_json(RunPaths(run_dir).manifest)
    client.app.state.store.create_run(m, str(run_dir))
    return m["run_id"]


def make_arm(
    src: Path, dest: Path, run_id: str, name: str, loss_shift: float = 0.1, **fields
) -> Path:
    """A run directory with `src`'s manifest and metrics log, renamed (no probes, no
    selections): enough for a baseline curve or a hand-made run."""
    m = read_json(RunPaths(src).manifest)
    m.update(run_id=run_id, name=name, **fields)
    m["config"] = {
        **m["config"],
        "name": name,
        "selection": {**m["config"]["selection"], "method": "random"},
    }
    dest.mkdir(parents=True)
    write_json(RunPaths(dest).manifest, m)
    rows = [json.loads(line) for line in RunPaths(src).metrics.read_text().splitlines()]
    for r in rows:
        r["heldout_loss"] += loss_shift
    RunPaths(dest).metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


@pytest.fixture
def tiny_dir(tiny_run, tmp_path) -> Path:
    """The session's tiny run under a name of its own: its real directory is
    `<base>/compare/mates`, where another test may have put a random arm beside it."""
    link = tmp_path / "tiny"
    link.symlink_to(tiny_run["dir"], target_is_directory=True)
    return link


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(dashboard_settings(tmp_path))) as c:
        yield c


def charts_of(page: str) -> dict[str, str]:
    """Chart id -> its SVG, from a run page."""
    return dict(
        re.findall(
            r'<div class="chart" id="chart-([a-z]+(?:-\d+)?)">(<svg.*?</svg>)', page, flags=re.S
        )
    )


def test_runs_list_shows_a_finished_run_with_its_latest_loss(client, tiny_dir):
    run_id = register(client, tiny_dir)
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    last = [json.loads(x) for x in RunPaths(tiny_dir).metrics.read_text().splitlines()][-1]
    row = re.search(rf'<tr data-run="{run_id}">(.*?)</tr>', r.text).group(1)
    assert f'href="/runs/{run_id}"' in row and ">done<" in row
    n = len(json.loads(RunPaths(tiny_dir).manifest.read_text())["stages"])
    assert f"{n}/{n} done" in row  # every stage ended; not "stage n-1 of 0..n-1"
    assert f"{last['heldout_loss']:.3f}" in row
    assert 'src="/static/runs.js"' in r.text  # the live refresh
    assert "setInterval(refreshRuns" in client.get("/static/runs.js").text
    assert client.get("/dashboard/rows").text.count("<tr") == 1
    # works offline: nothing is loaded from another host, only this server's /static files
    assert_only_local_resources(client, r.text)
    assert "http://" not in r.text and "https://" not in r.text


def test_an_empty_store_says_so(client):
    assert "no runs in the store yet" in client.get("/").text


def test_run_page_draws_every_chart(client, tiny_dir, tiny_run):
    run_id = register(client, tiny_dir)
    r = client.get(f"/runs/{run_id}")
    assert r.status_code == 200
    n = len(tiny_run["manifest"]["stages"])
    svgs = charts_of(r.text)
    expected = {
        "loss",
        "timeline",
        *(f"distribution-{k}" for k in range(n - 1)),
        *(f"domains-{k}" for k in range(1, n)),
    }
    assert expected <= set(svgs)
    for name, svg in svgs.items():
        assert "<path" in svg, name
    assert 'data-status="done"' in r.text and 'id="baseline"' not in r.text
    assert f'value="{run_id}/latest"' in r.text and 'id="score-form"' in r.text
    assert_only_local_resources(client, r.text)


def has_baseline_curve(page: str) -> bool:
    return "#7f7f7f" in charts_of(page)["loss"]  # the grey of report.loss_chart's baseline


def test_baseline_overlay_by_query_and_by_store_name(client, tiny_dir, tmp_path):
    run_id = register(client, tiny_dir)
    plain = client.get(f"/runs/{run_id}").text
    name = read_json(RunPaths(tiny_dir).manifest)["name"]

    other = register(client, make_arm(tiny_dir, tmp_path / "other", "other-00000001", "other"))
    r = client.get(f"/runs/{run_id}", params={"baseline": other})
    assert r.status_code == 200 and 'id="baseline"' in r.text and "?baseline=" in r.text
    assert f'href="/runs/{other}"' in r.text
    assert has_baseline_curve(r.text) and not has_baseline_curve(plain)

    # `mates compare` names its random arm `<name>-random`: found without asking
    arm = register(
        client, make_arm(tiny_dir, tmp_path / "arm", f"{name}-random-00000002", f"{name}-random")
    )
    r = client.get(f"/runs/{run_id}")
    assert f'href="/runs/{arm}"' in r.text and "comparison arm" in r.text
    assert has_baseline_curve(r.text)
    # the random arm's own page overlays nothing
    assert 'id="baseline"' not in client.get(f"/runs/{arm}").text

    assert client.get(f"/runs/{run_id}", params={"baseline": "nope-1"}).status_code == 404
    assert client.get(f"/runs/{run_id}", params={"baseline": "../x"}).status_code == 422


def test_baseline_found_in_a_comparison_directory(client, tiny_run, tmp_path):
    """`mates compare --out D` writes D/mates and D/random; the second need not be in the store."""
    cmp_dir = tmp_path / "cmp"
    cmp_dir.mkdir()
    (cmp_dir / "mates").symlink_to(tiny_run["dir"], target_is_directory=True)
    make_arm(tiny_run["dir"], cmp_dir / "random", "tiny-random-00000003", "tiny-random")
    run_id = register(client, cmp_dir / "mates")
    r = client.get(f"/runs/{run_id}")
    assert 'id="baseline"' in r.text and "tiny-random-00000003" in r.text


def test_unknown_runs_are_404_and_bad_ids_422(client):
    r = client.get("/runs/nope-00000000")
    assert r.status_code == 404 and "no run &#39;nope-00000000&#39;" in r.text
    assert r.headers["content-type"].startswith("text/html")
    for bad in ("..%2Fetc", ".hidden", "a%00b", "r" * 129):
        assert client.get(f"/runs/{bad}").status_code in (404, 422), bad


def test_names_and_errors_are_escaped(client, tiny_dir, tmp_path):
    run_id = "evil-00000004"
    register(
        client,
        make_arm(
            tiny_dir,
            tmp_path / "evil",
            run_id,
            EVIL,
            status="running",
            error='<img src=x onerror="alert(2)">',
        ),
    )
    for path in ("/", "/dashboard/rows", f"/runs/{run_id}"):
        text = client.get(path).text
        assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path
        assert "<img src=x" not in text, path
    page = client.get(f"/runs/{run_id}").text
    assert 'data-status="running"' in page and 'src="/static/run.js"' in page  # refreshes
    assert "refreshRun" in client.get("/static/run.js").text  # until it ends


def test_pages_are_not_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/runs/{run_id}", "/score", "/dashboard/rows"} & set(paths)
    assert "/v1/runs/{run_id}" in paths


def test_score_page_offers_the_model_versions(client, tiny_dir):
    run_id = register(client, tiny_dir)
    client.app.state.store.register_model(run_id, 1, "/m/1", {"val_spearman": 0.3})
    text = client.get("/score").text
    assert f'value="{run_id}/latest"' in text and f'<option value="{run_id}/1">' in text


def test_with_read_auth_pages_need_the_key(tmp_path, tiny_dir):
    with TestClient(create_app(dashboard_settings(tmp_path, read_auth=True))) as c:
        run_id = register(c, tiny_dir)
        c.app.state.store.register_model(run_id, 1, "/m/1", {"val_spearman": 0.3})
        for path in ("/", f"/runs/{run_id}", "/score"):
            r = c.get(path)
            assert r.status_code == 401 and "API key required" in r.text, path
            assert run_id not in r.text and "<svg" not in r.text, path  # no data at all
            assert r.headers["cache-control"] == "no-store"
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 403
            r = c.get(path, headers=AUTH)
            assert r.status_code == 200 and run_id in r.text, path
        r = c.get("/dashboard/rows")
        assert r.status_code == 401 and r.text == ""
        assert run_id in c.get("/dashboard/rows", headers=AUTH).text


def test_the_runs_list_reads_a_metrics_log_again_only_once_it_changed(tmp_path, monkeypatch):
    """Every refresh of the list wants each run's latest held-out loss: an unchanged log is
    not read again, an appended one is."""
    from services.api.routes import dashboard

    path = RunPaths(tmp_path).metrics
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"step": 0, "heldout_loss": 7.5}\n{"step": 5, "train_loss": 7.0}\n')
    reads = []
    real = dashboard.read_log
    monkeypatch.setattr(dashboard, "read_log", lambda p: reads.append(p) or real(p))
    assert dashboard._latest_loss(str(tmp_path)) == 7.5
    assert dashboard._latest_loss(str(tmp_path)) == 7.5
    assert len(reads) == 1
    with path.open("a") as f:
        f.write('{"step": 10, "heldout_loss": 6.25}\n')
    assert dashboard._latest_loss(str(tmp_path)) == 6.25
    assert len(reads) == 2
    assert dashboard._latest_loss(str(tmp_path / "gone")) is None


# --------------------------------------------------------------------------- a first reading


def drawn(svg: str) -> list[str]:
    """The texts matplotlib drew (it writes each as an SVG comment beside its glyphs)."""
    return re.findall(r"<!-- (.*?) -->", svg)


def test_run_page_shows_config_history_spearman_sizes_and_the_sign(client, tiny_dir, tiny_run):
    run_id = register(client, tiny_dir)
    text = client.get(f"/runs/{run_id}").text
    cfg = tiny_run["cfg"]
    config = re.search(r'<table class="config">.*?</table>', text, flags=re.S).group(0)
    per_step = cfg.train.batch_sequences * cfg.train.seq_tokens
    assert (
        f"= {per_step:,} tokens per step" in config and f"{cfg.probing.num_probes} probes" in config
    )
    history = re.search(r'<ol class="history">(.*?)</ol>', text, flags=re.S).group(1)
    events = RunPaths(tiny_run["dir"]).events  # e.g. an influence model below the quality gate
    logged = len(events.read_text(encoding="utf-8").splitlines()) if events.is_file() else 0
    assert "run created" in history
    if logged:  # an event splits its stage's line of transitions in two
        assert history.count("<li>") == 1 + len(tiny_run["manifest"]["stages"]) + 2 * logged
        assert "influence_gate" in history
    else:
        assert history.count("<li>") == 1 + len(tiny_run["manifest"]["stages"])
    val_size = tiny_run["manifest"]["stages"][0]["metrics"]["influence_model"]["val_size"]
    assert f"(n={val_size})" in text and ("too few to read" in text) == (val_size < 10)
    assert 'id="sign"' in text and "LOWER influence / score = MORE HELPFUL" in text
    assert any("lower = more helpful" in c for c in drawn(charts_of(text)["distribution-0"]))
    assert any(c.startswith("kept by stage 1") for c in drawn(charts_of(text)["distribution-0"]))


def test_run_page_shows_a_failure_and_the_resumption(client, tiny_dir, tmp_path):
    run_dir = make_arm(tiny_dir, tmp_path / "resumed", "resumed-00000010", "resumed")
    paths = RunPaths(run_dir)
    m = read_json(paths.manifest)
    t = m["stages"][1]["transitions"][1]["at"]
    m["stages"][1]["transitions"][1:2] = [
        {"state": "training", "at": t},
        {"state": "failed", "at": t + 1},
        {"state": "training", "at": t + 2},
    ]
    write_json(paths.manifest, m)
    paths.events.write_text(
        json.dumps({"at": t + 1, "stage": 1, "event": "failed", "reason": f"boom {EVIL}"}) + "\n"
    )
    text = client.get(f"/runs/{register(client, run_dir)}").text
    history = re.search(r'<ol class="history">(.*?)</ol>', text, flags=re.S).group(1)
    assert "resumed (failed → training)" in history
    assert "boom &lt;script&gt;" in history and EVIL not in text


def comparison(tiny_dir: Path, tmp_path: Path) -> Path:
    """`mates compare`'s layout for one seed: DIR/seed-0/{mates,random,dsir,static}."""
    seed = tmp_path / "cmp" / "seed-0"
    seed.mkdir(parents=True)
    (seed / "mates").symlink_to(tiny_dir.resolve(), target_is_directory=True)
    for i, arm in enumerate(("random", "dsir", "static")):
        make_arm(
            tiny_dir, seed / arm, f"tiny-{arm}-0000002{i}", f"tiny-{arm}", loss_shift=0.05 * (i + 1)
        )
    write_json(tmp_path / "cmp" / "comparison.json", {"seeds": [0]})
    return seed


def test_every_arm_of_a_comparison_is_overlaid(client, tiny_dir, tmp_path):
    from services.api.routes import dashboard

    seed = comparison(tiny_dir, tmp_path)
    run_id = register(client, seed / "mates")
    dsir = register(client, seed / "dsir")  # the others are not in the store
    run = client.app.state.store.get_run(run_id)
    assert [label for label, _ in dashboard.find_arms(client.app.state.store, run)] == [
        "random",
        "dsir",
        "static",
    ]
    assert dashboard.find_baseline(client.app.state.store, run) == seed / "random"
    text = client.get(f"/runs/{run_id}").text
    assert {"held-out, random", "held-out, dsir", "held-out, static"} <= set(
        drawn(charts_of(text)["loss"])
    )
    assert has_baseline_curve(text)
    note = re.search(r'<p class="notice" id="baseline">(.*?)</p>', text, flags=re.S).group(1)
    assert f'<a href="/runs/{dsir}">dsir</a>' in note and "comparison arm" in note
    assert "tiny-random-00000020" in note and 'href="/runs/tiny-random-00000020"' not in note
    # an arm's page overlays its siblings, the random arm's too
    assert {"held-out, mates", "held-out, random", "held-out, static"} <= set(
        drawn(charts_of(client.get(f"/runs/{dsir}").text)["loss"])
    )
    random_id = register(client, seed / "random")
    assert "held-out, dsir" in drawn(charts_of(client.get(f"/runs/{random_id}").text)["loss"])
    # ?baseline= still draws the one arm asked for
    text = client.get(f"/runs/{run_id}", params={"baseline": dsir}).text
    loss = drawn(charts_of(text)["loss"])
    assert "held-out, tiny-dsir" in loss and "held-out, random" not in loss and "?baseline=" in text


def test_a_broken_sibling_arm_does_not_break_the_page(client, tiny_dir, tmp_path):
    seed = comparison(tiny_dir, tmp_path)
    (seed / "static" / "run.json").write_text("{")
    (seed / "notes").mkdir()
    r = client.get(f"/runs/{register(client, seed / 'mates')}")
    assert r.status_code == 200
    loss = drawn(charts_of(r.text)["loss"])
    assert "held-out, dsir" in loss and "held-out, static" not in loss


def test_cooldown_points_on_the_loss_chart(client, tiny_dir, tmp_path):
    run_dir = make_arm(tiny_dir, tmp_path / "cool", "cool-00000030", "cool")
    m = read_json(RunPaths(run_dir).manifest)
    write_json(
        RunPaths(run_dir).cooldown(0),
        {
            "stage": 0,
            "tokens": m["stages"][0]["metrics"]["tokens"],
            "primary": "heldout",
            "sets": {"heldout": {"kind": "text", "loss": 6.0, "accuracy": None}},
        },
    )
    text = client.get(f"/runs/{register(client, run_dir)}").text
    assert "after lr cooldown (heldout)" in drawn(charts_of(text)["loss"])
    bare = make_arm(tiny_dir, tmp_path / "bare", "bare-00000031", "bare")  # no cooldown files
    text = client.get(f"/runs/{register(client, bare)}").text
    assert not any("cooldown" in c for c in drawn(charts_of(text)["loss"]))
