"""`mates runs ...` and `mates serve` against a real uvicorn server of the control plane.

The server runs in a subprocess on a free loopback port, with a SQLite store the test
also opens to put runs in given states, and the test Redis as its broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import TINY_CONFIG
from procs import Proc, wait_http

from mates.artifacts import RunPaths
from mates.cli import main
from mates.manifest import Manifest
from services.common.settings import get_settings
from services.common.store import Store

KEY = "cli-test-key-0123456789"
MATES_BIN = str(Path(sys.executable).parent / "mates")


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_url):
    """(base URL, store, artifacts dir) of a running `uvicorn services.api.app:create_app`."""
    import socket

    root = tmp_path_factory.mktemp("api")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MATES_API_KEY": KEY,
        "MATES_DEV": "0",
        "MATES_READ_AUTH": "0",
        "MATES_DATABASE_URL": f"sqlite:///{root}/runs.db",
        "MATES_BROKER_URL": redis_url,
        "MATES_ARTIFACTS_DIR": str(root / "artifacts"),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "services.api.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "wb"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the API server did not start:\n{(root / 'server.log').read_text()}")
        time.sleep(0.1)
    store = Store(f"sqlite:///{root}/runs.db")
    yield url, store, root / "artifacts"
    store.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def api(server, monkeypatch):
    url, _, _ = server
    monkeypatch.setenv("MATES_API_URL", url)
    monkeypatch.setenv("MATES_API_KEY", KEY)
    return server


def hand_made_run(store: Store, root, run_id: str, states: list[str], status: str) -> Manifest:
    """A one-stage run whose stage went through `states`, mirrored into the store."""
    m = Manifest.create(RunPaths(root / run_id).manifest, {"name": "hand"}, "fp", 1, run_id=run_id)
    store.create_run(m.data, str(m.path.parent))
    m.on_save = store.sync_manifest
    for state in states:
        m.transition(0, state, error="boom" if state == "failed" else None)
    m.set_status(status, "stage 0: boom" if status == "failed" else None)
    return m


def test_submit_list_show_cancel(api, capsys, demo_base, monkeypatch):
    monkeypatch.chdir(demo_base)  # the preset's relative data paths resolve here
    assert main(["runs", "submit", str(TINY_CONFIG), "--set", "stages.num_stages=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted run tiny-") and "queued, 2 stages" in out
    run_id = out.split()[2].rstrip(":")

    assert main(["runs", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(run_id))
    # columns: status, stages done of all, the stage it is at, that stage's state
    assert line.split()[1:5] == ["queued", "0/2", "0", "pending"]
    assert main(["runs", "list", "--status", "done"]) == 0
    assert capsys.readouterr().out.strip() == "no runs"

    assert main(["runs", "show", run_id]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {run_id} (tiny): queued") and "stage" in out
    assert "nan" not in out  # nothing measured yet: '-', not nan
    assert main(["runs", "show", run_id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == run_id and [s["state"] for s in shown["stages"]] == ["pending"] * 2
    assert shown["config"]["data"]["pool"] == str(demo_base / "data" / "demo" / "pool.jsonl")

    assert main(["runs", "cancel", run_id]) == 0
    assert capsys.readouterr().out.startswith(f"run {run_id}: cancelling")
    assert main(["runs", "cancel", run_id]) == 2
    err = capsys.readouterr().err
    assert "409" in err and "only an active run can be cancelled" in err
    assert main(["runs", "resume", run_id]) == 2
    assert "409" in capsys.readouterr().err


def test_resume_of_a_failed_run(api, capsys):
    _, store, root = api
    hand_made_run(store, root, "resume-0001", ["training", "failed"], "failed")
    assert main(["runs", "resume", "resume-0001"]) == 0
    assert capsys.readouterr().out.strip() == (
        "run resume-0001: queued (generation 1, from stage 0)"
    )


def test_submit_of_a_bad_config_names_the_field(api, capsys, demo_base, monkeypatch):
    monkeypatch.chdir(demo_base)
    # the CLI validates first: the server never sees it
    assert main(["runs", "submit", str(TINY_CONFIG), "--set", "selection.ratio=1.5"]) == 2
    assert "`selection.ratio`" in capsys.readouterr().err
    # data files are checked on the server, which names the field and path
    assert main(["runs", "submit", str(TINY_CONFIG), "--set", "data.pool=/nowhere/pool.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "422" in err and "`data.pool`" in err and "/nowhere/pool.jsonl" in err


def test_watch_prints_changes_until_the_run_ends(api, capsys):
    _, store, root = api
    hand_made_run(store, root, "done-0001", ["training", "selecting", "done"], "done")
    assert main(["runs", "watch", "done-0001", "--interval", "0.05"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 2)[2] for line in out] == [
        "stage 0: pending",
        "stage 0: training",
        "stage 0: selecting",
        "stage 0: done",
        "run done-0001: done",
    ]

    hand_made_run(store, root, "failed-0001", ["training", "failed"], "failed")
    assert main(["runs", "watch", "failed-0001", "--interval", "0.05"]) == 1
    out = capsys.readouterr().out
    assert "stage 0: failed (boom)" in out and "run failed-0001: failed: stage 0: boom" in out

    live = hand_made_run(store, root, "live-0001", ["training"], "running")

    def finish() -> None:
        time.sleep(0.5)
        live.transition(0, "selecting")
        live.transition(0, "done")
        live.set_status("done")

    t = threading.Thread(target=finish)
    t.start()
    assert main(["runs", "watch", "live-0001", "--interval", "0.05"]) == 0
    t.join()
    out = [line.split(" ", 2)[2] for line in capsys.readouterr().out.splitlines()]
    assert out == [
        "stage 0: pending",
        "stage 0: training",
        "run live-0001: running",
        "stage 0: selecting",
        "stage 0: done",
        "run live-0001: done",
    ]


def test_a_finished_run_lists_every_stage_done(api, capsys):
    _, store, root = api
    hand_made_run(store, root, "finished-0001", ["training", "selecting", "done"], "done")
    assert main(["runs", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("finished-0001"))
    assert line.split()[1:5] == ["done", "1/1", "0", "done"]


def test_errors_are_clear(api, capsys, monkeypatch, unused_port):
    url, _, _ = api
    assert main(["runs", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: GET /v1/runs/nope: 404") and "no run 'nope'" in err

    monkeypatch.setenv("MATES_API_KEY", "wrong")
    assert main(["runs", "cancel", "nope"]) == 2
    assert "403 invalid API key" in capsys.readouterr().err

    dead = f"http://127.0.0.1:{unused_port()}"
    assert main(["runs", "--api", dead, "list"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the MATES API at {dead}" in err and "mates serve api" in err
    # --api also goes after the subcommand, and beats MATES_API_URL
    assert main(["runs", "list", "--api", dead]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(["runs", "--api", url, "list"]) == 0


def test_serve_calls_the_service(monkeypatch):
    import services.api.app as api_app

    called = []
    monkeypatch.setattr(api_app, "serve", lambda: called.append("api"))
    assert main(["serve", "api"]) == 0 and called == ["api"]


def test_serve_refuses_the_placeholder_key(monkeypatch):
    monkeypatch.setenv("MATES_API_KEY", "change-me")
    monkeypatch.setenv("MATES_DEV", "0")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit, match="placeholder"):
            main(["serve", "api"])
    finally:
        get_settings.cache_clear()


def test_serve_takes_host_port_and_concurrency(monkeypatch, unused_port, tmp_path):
    """`mates serve scorer --host --port` listens there (a real uvicorn); a worker's
    --concurrency reaches its settings; an option a service has no use for is refused."""
    port = unused_port()
    env = {
        **os.environ,
        "MATES_API_KEY": KEY,
        "MATES_SCORER_PORT": "1",  # the option beats the environment
        "MATES_ARTIFACTS_DIR": str(tmp_path),
        "MATES_DATABASE_URL": f"sqlite:///{tmp_path}/runs.db",
    }
    proc = Proc(
        "scorer",
        [MATES_BIN, "serve", "scorer", "--host", "127.0.0.1", "--port", str(port)],
        env,
        tmp_path,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", [proc], timeout=60)
    finally:
        proc.stop()

    import services.worker.main as worker_main

    seen = []
    monkeypatch.setattr(
        worker_main, "serve", lambda: seen.append(get_settings().worker_concurrency)
    )
    monkeypatch.delenv("MATES_WORKER_CONCURRENCY", raising=False)
    try:
        assert main(["serve", "worker", "--concurrency", "5"]) == 0 and seen == [5]
    finally:
        os.environ.pop("MATES_WORKER_CONCURRENCY", None)
        get_settings.cache_clear()
    assert main(["serve", "trainer", "--port", "9000"]) == 2
    with pytest.raises(SystemExit):
        main(["serve", "api", "--port", "70000"])
