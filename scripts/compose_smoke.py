"""`make compose-smoke`: the real docker-compose.yml, started on a Docker engine, driven end
to end through the published API.

Where no public image registry is reachable it starts a private `dockerd` (its own socket,
data root under the cache folder, PID file; stopped by PID at the end, also on failure),
imports a Debian base made by mmdebstrap (cached), builds the project's images on it with
`deploy/local/compose.local.yml` over the production file, and brings the stack up with
`docker compose up --wait`. Then, through the API only:

1. submit configs/tiny.yaml (data mounted at /data) and wait for `done`;
2. score three documents through /v1/score, read the dashboard's `/`, and check that the
   artifacts volume holds the run;
3. start a second run, SIGKILL the worker container while it fits or scores, and check that
   the run still ends `done` after the restart policy brings the worker back, with one
   influence-model version per stage.

`docker compose down -v` at the end. Where no engine can start (not root, no dockerd, no
kernel support) it says so in one line and exits 1, or 0 with MATES_ALLOW_NO_DOCKER=1; it
never reports a pass it did not run. Settings: MATES_COMPOSE_CACHE (default
~/.cache/mates-compose): the base image's root file system and the engine's data root,
reused by the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_engine import (  # noqa: E402
    Engine,
    NoEngine,
    Stack,
    free_ports,
    package_index_settings,
    prepare_tools,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
RUN_TIMEOUT_S = 600
WORKER_PHASES = ("fitting", "scoring", "selecting")


def log(message: str) -> None:
    print(f"compose-smoke: {message}", flush=True)


class Check:
    """Times the steps and keeps what each measured, for the summary at the end."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.rows: list[tuple[str, float]] = []
        self._t = self.start

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.rows.append((step, now - self._t))
        log(f"{step}: {now - self._t:.1f} s")
        self._t = now

    def summary(self) -> str:
        lines = [f"  {step:<44} {s:7.1f} s" for step, s in self.rows]
        lines.append(f"  {'total':<44} {time.monotonic() - self.start:7.1f} s")
        return "\n".join(lines)


def run_body(name: str) -> dict[str, Any]:
    """configs/tiny.yaml as a request body, its data paths moved under the /data mount."""
    config = yaml.safe_load(CONFIG.read_text())
    config["name"] = name
    for key in ("pool", "reference", "heldout"):
        path = config["data"][key]
        if not path.startswith("data/"):
            raise SystemExit(f"{CONFIG}: data.{key} must sit under data/ (it is {path!r})")
        config["data"][key] = "/" + path
    return config


def wait_for(api: httpx.Client, run_id: str, until, timeout: float = RUN_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"/v1/runs/{run_id}").raise_for_status().json()
        if until(run):
            return run
        if run["status"] in ("failed", "cancelled"):
            raise AssertionError(f"run {run_id} ended {run['status']}: {run.get('error')}")
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not get there in {timeout:.0f} s: {run['status']}")


def stage_state(run: dict) -> str:
    stage = run["stages"][run["current_stage"]]
    return str(stage["state"])


def first_run(api: httpx.Client, stack: Stack, check: Check) -> str:
    run_id = api.post("/v1/runs", json=run_body("smoke")).raise_for_status().json()["id"]
    run = wait_for(api, run_id, lambda r: r["status"] == "done")
    states = [s["state"] for s in run["stages"]]
    assert states == ["done"] * len(states), f"{run_id}: stage states {states}"
    check.done(f"run 1 ({run_id}) reached done")

    docs = [
        {"id": "a", "text": "Shares rose after the central bank's report on inflation."},
        {"id": "b", "text": "The striker scored twice in the second half."},
        {"id": "c", "text": "Shall I compare thee to a summer's day?"},
    ]
    r = api.post("/v1/score", json={"model": f"{run_id}/latest", "documents": docs})
    r.raise_for_status()
    scores = r.json()
    assert [s["id"] for s in scores] == ["a", "b", "c"], scores
    assert all(isinstance(s["score"], float) for s in scores), scores
    version = r.headers.get("X-Model-Version", "")
    assert version.startswith(f"{run_id}/"), f"X-Model-Version {version!r}"
    log(f"/v1/score: {scores} ({version})")

    page = api.get("/")
    page.raise_for_status()
    assert run_id in page.text, "the dashboard's / does not list the run"

    listing = stack.exec("api", "ls", f"/artifacts/{run_id}")
    files = set(listing.split())
    expected = {"run.json", "stage-0", "stage-1", "stage-2", "final-model"}
    assert expected <= files, f"artifacts volume holds {sorted(files)} for {run_id}"
    manifest = json.loads(stack.exec("api", "cat", f"/artifacts/{run_id}/run.json"))
    assert manifest["status"] == "done", manifest["status"]
    check.done("scored 3 documents, read /, artifacts volume holds the run")
    return run_id


def second_run(api: httpx.Client, stack: Stack, engine: Engine, check: Check) -> str:
    run_id = api.post("/v1/runs", json=run_body("smoke-kill")).raise_for_status().json()["id"]
    before = engine.restart_count(stack.container("worker"))
    run = wait_for(api, run_id, lambda r: stage_state(r) in WORKER_PHASES or r["status"] == "done")
    if run["status"] == "done":
        raise AssertionError(f"{run_id} ended before the worker could be killed")
    phase = f"stage {run['current_stage']} {stage_state(run)}"
    # The crash as the kernel deals it (the OOM killer, a segfault): SIGKILL to the
    # container's main process from outside. `docker compose kill` would not do: the engine
    # records a kill it was asked for as a manual stop and applies no restart policy.
    pid = engine.main_pid(stack.container("worker"))
    os.kill(pid, 9)
    log(f"SIGKILL to the worker container's main process (pid {pid}) during {phase}")
    deadline = time.monotonic() + 120
    while engine.restart_count(stack.container("worker")) <= before:
        if time.monotonic() > deadline:
            raise AssertionError("the worker container was not restarted within 120 s")
        time.sleep(0.5)
    check.done(f"worker killed during {phase}, restarted by its policy")

    run = wait_for(api, run_id, lambda r: r["status"] == "done")
    models = api.get("/v1/models", params={"run_id": run_id}).raise_for_status().json()
    stages = sorted(m["stage"] for m in models if m["run_id"] == run_id)
    fitted = list(range(run["num_stages"] - 1))
    assert stages == fitted, f"{run_id}: model versions for stages {stages}, expected {fitted}"
    check.done(f"run 2 ({run_id}) reached done, one model version per stage {fitted}")
    return run_id


def main() -> int:
    check = Check()
    try:
        tools = prepare_tools()
    except NoEngine as e:
        return no_engine(str(e))
    cache = Path(os.environ.get("MATES_COMPOSE_CACHE", "~/.cache/mates-compose")).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one smoke run per cache (engine data root) at a time
        engine = Engine(tools, cache)
        try:
            engine.start()
        except NoEngine as e:
            return no_engine(str(e))
        try:
            check.done("dockerd started")
            return smoke(engine, cache, check)
        finally:
            engine.stop()


def smoke(engine: Engine, cache: Path, check: Check) -> int:
    ports = free_ports(4)
    key = secrets.token_hex(16)
    pip_conf, ca = package_index_settings(engine.run_dir)
    env = {
        "MATES_API_KEY": key,
        "MATES_LOCAL_API_PORT": str(ports[0]),
        "MATES_LOCAL_SCORER_PORT": str(ports[1]),
        "MATES_LOCAL_REDIS_PORT": str(ports[2]),
        "MATES_LOCAL_POSTGRES_PORT": str(ports[3]),
        "MATES_LOCAL_PIP_CONF": str(pip_conf),
        "MATES_LOCAL_CA_CERT": str(ca),
    }
    stack = Stack(engine, ROOT, env)
    try:
        built = engine.os_image(cache)
        check.done(f"Debian base image ({built})")
        built = stack.base_image()
        check.done(f"torch base image ({built})")
        stack.compose("build")
        check.done("compose build (mates, redis, postgres)")
        stack.compose("down", "-v", "--remove-orphans")  # what a killed earlier run left
        stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--no-build")
        check.done("compose up --wait: every healthcheck passed")
        base = f"http://127.0.0.1:{ports[0]}"
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as api:
            first_run(api, stack, check)
            second_run(api, stack, engine, check)
    except Exception as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        stack.dump_logs()
        return 1
    finally:
        try:
            stack.compose("down", "-v", "--remove-orphans")
            check.done("compose down -v")
        except Exception as e:  # the engine is stopped next in any case
            log(f"compose down failed: {e}")
    log("passed\n" + check.summary())
    return 0


def no_engine(reason: str) -> int:
    allowed = os.environ.get("MATES_ALLOW_NO_DOCKER") == "1"
    tail = (
        "not run (MATES_ALLOW_NO_DOCKER=1)" if allowed else "set MATES_ALLOW_NO_DOCKER=1 to go on"
    )
    print(f"compose-smoke: no Docker engine can start here: {reason}; {tail}", flush=True)
    return 0 if allowed else 1


if __name__ == "__main__":
    sys.exit(main())
