"""Faults done for real against the real stack, and what must survive them.

A private `redis-server` (killed with SIGKILL and restarted on the same port), uvicorn
(api, scorer) and Celery (trainer, prefork worker) processes, all on loopback ports and
stopped by PID. The run is the tiny preset cut to two stages, with a fit slow enough
(`influence.epochs`) to be caught inside and small scoring shards (`score_shard_docs`);
every interrupted run must end with the selection of the same config run uninterrupted
in one process, one registered model version, and each pool document scored once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("celery")
pytest.importorskip("fastapi")

import httpx  # noqa: E402
import redis  # noqa: E402
from procs import Proc, free_port, wait_http  # noqa: E402

from mates.artifacts import RunPaths, read_json, read_jsonl  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "faults-key-0123456789"
TERMINAL = ("done", "failed", "cancelled")
# the fit must outlast the pool-process kill yet end well inside VISIBILITY_S (a longer task
# is redelivered while it runs): 2 folds of 15 epochs and a refit, about 30 epochs' work
FAULT_RUN = (
    "name=faults",
    "stages.num_stages=2",
    "influence.epochs=15",
    "influence.cv_folds=2",
    "influence.score_shard_docs=10",
)
VISIBILITY_S = 8  # a task held by a dead worker is redelivered after this long
SCORER_RETRIES = 8  # backoff 1, 2, 2, ... s: a scorer down for ~15 s fails the stage
MAX_DELIVERIES = 3


class RedisServer:
    """A redis-server of our own on a fixed port: killed with SIGKILL, started again."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_port()
        self.pidfile = workdir / "redis.pid"
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, aof: bool = False) -> None:
        persist = (
            ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        )
        self.pidfile.unlink(missing_ok=True)
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persist,
                "--dir",
                str(self.dir),
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        _until(lambda: self.pidfile.is_file() and _pings(self.url), 10, "redis-server to answer")
        self.pid = int(self.pidfile.read_text().strip())

    def kill(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            _until(lambda: not _pings(self.url), 10, "redis-server to die")
            self.pid = None


def _pings(url: str) -> bool:
    try:
        return bool(
            redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping()
        )
    except redis.RedisError:
        return False


def _until(check, timeout: float, what: str, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Stack:
    """api + scorer + trainer + worker over `redis`; processes can be killed and replaced."""

    def __init__(self, redis_server: RedisServer, base: Path):
        from services.common.store import Store

        self.redis, self.base = redis_server, base
        self.api_port, self.scorer_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "MATES_API_KEY": KEY,
            "MATES_DATABASE_URL": f"sqlite:///{base / 'runs.db'}",
            "MATES_BROKER_URL": redis_server.url,
            "MATES_ARTIFACTS_DIR": str(base / "artifacts"),
            "MATES_API_PORT": str(self.api_port),
            "MATES_SCORER_PORT": str(self.scorer_port),
            "MATES_SCORER_URL": f"http://127.0.0.1:{self.scorer_port}",
            "MATES_SCORE_MODE": "http",
            "MATES_HTTP_TIMEOUT_S": "10",
            "MATES_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
            "MATES_TASK_MAX_RETRIES": str(SCORER_RETRIES),
            "MATES_TASK_RETRY_BACKOFF_S": "1",
            "MATES_TASK_RETRY_BACKOFF_MAX_S": "2",
            "MATES_TASK_RETRY_JITTER": "false",
            "MATES_TASK_MAX_DELIVERIES": str(MAX_DELIVERIES),
            "MATES_BROKER_WATCH_S": "1",
            # a message lost between its queue and the unacked hash (a kill at that instant)
            # is published again after this long without a delivery; above VISIBILITY_S, so
            # that the redelivery of an unacknowledged task comes first
            "MATES_STALL_S": "20",
            "MATES_THREADS": "1",
            "MATES_WORKER_CONCURRENCY": "2",
            "MATES_WORKER_POOL": "prefork",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        self.procs: dict[str, Proc] = {}
        self.old: list[Proc] = []
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.client = httpx.Client(
            base_url=self.api, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
        )
        self.store = Store(self.env["MATES_DATABASE_URL"])

    # -- processes

    def start(self, kind: str) -> Proc:
        if kind in self.procs:
            self.old.append(self.procs[kind])
        n = sum(p.name.startswith(kind) for p in [*self.old, *self.procs.values()])
        name = f"{kind}{n}" if n else kind  # each incarnation keeps its own log
        proc = Proc(
            name,
            [sys.executable, "-m", "mates.cli", "serve", kind],
            {**self.env, "MATES_NODE_NAME": name},
            self.base,
        )
        self.procs[kind] = proc
        return proc

    def ready(self, *kinds: str) -> None:
        procs = [self.procs[k] for k in kinds]
        if "scorer" in kinds:
            wait_http(f"http://127.0.0.1:{self.scorer_port}/readyz", procs)
        if "api" in kinds:
            wait_http(f"{self.api}/readyz", procs)
        celery_kinds = [k for k in kinds if k in ("trainer", "worker")]
        if celery_kinds:
            _until(
                lambda: set(celery_kinds) <= self.log_says("ready."),
                120,
                f"{celery_kinds} to be ready",
                every=0.2,
            )

    def log_says(self, text: str) -> set[str]:
        return {
            k
            for k, p in self.procs.items()
            if p.log.is_file() and text in p.log.read_text(errors="replace")
        }

    def pool_children(self, kind: str = "worker") -> list[int]:
        pid = self.procs[kind].pid
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def kill_group(self, kind: str) -> None:
        """SIGKILL a service and its pool processes at once (a lost machine)."""
        proc = self.procs[kind]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def stop_all(self) -> None:
        for p in [*reversed(self.procs.values()), *self.old]:
            p.stop()
            try:  # pool processes of a prefork worker share its process group
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.client.close()
        self.store.close()

    def logs(self) -> str:
        return "\n".join(p.tail(40) for p in [*self.old, *self.procs.values()])

    # -- runs

    def submit(self, cfg) -> str:
        r = self.client.post("/v1/runs", json=cfg.model_dump(mode="json"))
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def run(self, run_id: str) -> dict:
        r = self.client.get(f"/v1/runs/{run_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def paths(self, run_id: str) -> RunPaths:
        return RunPaths(self.base / "artifacts" / run_id)

    def wait_run(self, run_id: str, until=TERMINAL, timeout: float = 150.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            run = self.run(run_id)
            if run["status"] in until:
                return run
            time.sleep(0.25)
        raise AssertionError(
            f"run {run_id} stayed {run['status']} for {timeout:.0f}s\n{self.logs()}"
        )

    def wait_stage0(self, run_id: str, state: str, timeout: float = 120.0) -> None:
        _until(
            lambda: self.store.get_run(run_id)["stages"][0]["state"] == state,
            timeout,
            f"stage 0 of {run_id} to be {state}\n{self.logs()}",
            every=0.02,
        )

    def shards_scored(self, run_id: str) -> int:
        d = self.paths(run_id).stage(0)
        return len(list(d.glob("scores/*.jsonl"))) if d.is_dir() else 0

    def wait_scoring(self, run_id: str, shards: int) -> None:
        """Until some but not all of stage 0's shards are scored."""
        _until(
            lambda: 0 < self.shards_scored(run_id) < shards,
            120,
            f"stage 0 of {run_id} half scored\n{self.logs()}",
            every=0.02,
        )

    def wait_shard_running(self, run_id: str, shards: int) -> None:
        """Until stage 0 is half scored and a shard task is running (it beats: started, and
        counted its delivery), not merely received by a worker."""

        def running() -> bool:
            return 0 < self.shards_scored(run_id) < shards and any(
                h["task"] == "mates.score_shard" for h in self.store.list_heartbeats(run_id)
            )

        _until(running, 120, f"a shard of {run_id} running\n{self.logs()}", every=0.01)


@contextmanager
def private_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def running_stack(
    redis_server: RedisServer, base: Path, env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """Every service started (with `env` on top of the stack's) and ready; all stopped after."""
    stack = Stack(redis_server, base)
    stack.env.update(env or {})
    kinds = ("scorer", "api", "trainer", "worker")
    try:
        for kind in kinds:
            stack.start(kind)
        stack.ready(*kinds)
        yield stack
    finally:
        stack.stop_all()


def embedded_run(cfg, base: Path) -> RunPaths:
    """`cfg` run in one process without faults: what every faulted run must match."""
    from mates.run import Run

    paths = RunPaths(base / "run")
    Run(cfg, paths.root, progress=False).execute()
    return paths


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    with running_stack(redis_server, tmp_path_factory.mktemp("faults")) as stack:
        yield stack


@pytest.fixture(scope="module")
def fault_cfg(tiny_config_factory):
    return tiny_config_factory(*FAULT_RUN)


@pytest.fixture(scope="module")
def uninterrupted(fault_cfg, tmp_path_factory):
    paths = embedded_run(fault_cfg, tmp_path_factory.mktemp("uninterrupted"))
    return {
        "selection": read_json(paths.selection(1))["ids"],
        "shards": -(-len(read_json(paths.pool(1))["ids"]) // fault_cfg.influence.score_shard_docs),
    }


def assert_same_outcome(stack: Stack, run_id: str, uninterrupted: dict) -> None:
    """Done, one model version, every pool document scored once, the uninterrupted selection."""
    run = stack.run(run_id)
    assert run["status"] == "done", (run["status"], run["error"], stack.logs())
    models = stack.client.get("/v1/models", params={"run_id": run_id}).json()
    assert [m["version"] for m in models] == [f"{run_id}/0"]
    paths = stack.paths(run_id)
    scored = [r["id"] for r in read_jsonl(paths.scores(0))]
    assert scored == read_json(paths.pool(1))["ids"]  # each once, in pool order
    sel = stack.client.get(f"/v1/runs/{run_id}/stages/1/selection").json()
    assert sel["ids"] == uninterrupted["selection"]
    assert sel["model_version"] == f"{run_id}/0"


def _unfinished(log: Path, task: str) -> set[str]:
    """IDs of `task` a worker received and never reported finished."""
    text = log.read_text(errors="replace")
    received = set(re.findall(rf"Task {re.escape(task)}\[([0-9a-f-]+)\] received", text))
    ended = set(re.findall(r"Task [\w.]+\[([0-9a-f-]+)\] (?:succeeded|retry|raised)", text))
    return received - ended


def test_worker_killed_inside_fit_and_inside_score_shard(stack, fault_cfg, uninterrupted):
    """SIGKILL the pool process running `fit_influence_model` (redelivered at once: the task
    is rejected on worker loss), then the whole worker while it scores shards (redelivered by
    the visibility timeout to a fresh worker): the run finishes once, as if never hit."""
    run_id = stack.submit(fault_cfg)

    stack.wait_stage0(run_id, "fitting")
    children = stack.pool_children()
    assert children
    for pid in children:
        os.kill(pid, signal.SIGKILL)

    stack.wait_shard_running(run_id, uninterrupted["shards"])
    stack.kill_group("worker")
    killed_log = stack.procs["worker"].log
    in_flight = _unfinished(killed_log, "mates.score_shard")
    assert in_flight, "the worker was killed between shards, not inside one"
    stack.start("worker")
    stack.ready("worker")

    stack.wait_run(run_id)
    assert_same_outcome(stack, run_id, uninterrupted)
    text = killed_log.read_text(errors="replace")
    assert "WorkerLostError" in text and "signal 9" in text
    counts = {
        (d["task"], d["shard"]): d["count"]
        for d in stack.store.list_deliveries(run_id)
        if d["attempt"] == 0
    }
    assert counts[("mates.fit_influence_model", -1)] == 2  # killed once, finished once
    assert max(counts[("mates.score_shard", s)] for s in range(uninterrupted["shards"])) == 2
    fresh = stack.procs["worker"].log.read_text(errors="replace")
    assert any(f"[{task_id}] received" in fresh for task_id in in_flight)


def test_redis_killed_without_persistence_fails_the_run_resumably(
    stack, redis_server, fault_cfg, uninterrupted
):
    """kill -9 Redis (no persistence) while shards are queued: its queues are gone. The run
    stays listed, is failed with the reason by the workers once Redis is back, the API is
    ready again, and one POST resume takes it to done with the uninterrupted selection."""
    run_id = stack.submit(fault_cfg)
    stack.wait_scoring(run_id, uninterrupted["shards"])
    redis_server.kill()
    assert stack.client.get("/readyz").status_code == 503
    listed = {r["id"]: r for r in stack.client.get("/v1/runs").json()}
    assert listed[run_id]["status"] == "running"

    redis_server.start()
    _until(lambda: stack.client.get("/readyz").status_code == 200, 30, "the API to be ready")
    run = stack.wait_run(run_id, timeout=60)
    assert run["status"] == "failed", run
    # a shard that could not store its result failed the run at once; otherwise the workers'
    # broker watch found the emptied Redis and failed the run its lost tasks stranded
    assert (
        "lost its queued tasks" in run["error"] or f"127.0.0.1:{redis_server.port}" in run["error"]
    ), run["error"]
    assert run["stages"][0]["state"] == "failed"
    assert any(r["id"] == run_id for r in stack.client.get("/v1/runs").json())

    r = stack.client.post(f"/v1/runs/{run_id}/resume")
    assert r.status_code == 202, r.text
    stack.wait_run(run_id)
    assert_same_outcome(stack, run_id, uninterrupted)


def test_redis_killed_with_aof_loses_nothing(stack, redis_server, fault_cfg, uninterrupted):
    """With an append-only file (fsync always) a kill -9 loses no message: after the restart
    the queued shards are consumed and the unacknowledged ones redelivered; the run reaches
    done with no call, in the generation it was created with."""
    redis_server.kill()
    redis_server.start(aof=True)
    # the new, empty Redis is noticed (no active run to fail) before this run starts
    _until(
        lambda: redis.Redis.from_url(redis_server.url).get("mates:broker-marker"),
        30,
        "the workers to mark the new broker",
    )
    run_id = stack.submit(fault_cfg)
    stack.wait_scoring(run_id, uninterrupted["shards"])
    redis_server.kill()
    time.sleep(1.0)
    redis_server.start(aof=True)
    stack.wait_run(run_id, timeout=120)
    assert_same_outcome(stack, run_id, uninterrupted)
    assert stack.run(run_id)["generation"] == 1
    assert stack.client.get("/readyz").status_code == 200


def test_scorer_down_while_scoring_waits_then_completes(stack, fault_cfg, uninterrupted):
    """SIGKILL the scorer mid-scoring: the shards retry with backoff, the stage shows
    `scorer_wait` (retries, error) through the API, and finishes once the scorer is back."""
    run_id = stack.submit(fault_cfg)
    stack.wait_scoring(run_id, uninterrupted["shards"])
    stack.kill_group("scorer")

    def waiting():
        wait = stack.run(run_id)["stages"][0]["metrics"].get("scorer_wait")
        return wait if wait and wait["state"] == "waiting" else None

    wait = _until(waiting, 30, "the stage to report that it waits for the scorer")
    assert wait["max_retries"] == SCORER_RETRIES and "unreachable" in wait["error"]
    assert stack.run(run_id)["status"] == "running"
    stack.start("scorer")
    stack.ready("scorer")
    stack.wait_run(run_id)
    assert_same_outcome(stack, run_id, uninterrupted)
    assert stack.run(run_id)["stages"][0]["metrics"]["scorer_wait"]["state"] == "recovered"
    events = [e["event"] for e in read_jsonl(stack.paths(run_id).events)]
    assert "waiting for scorer" in events and "scorer back" in events


def test_scorer_that_never_returns_fails_the_run_with_the_reason(stack, fault_cfg):
    """With the scorer gone for good, the retries run out and the run fails, saying why."""
    run_id = stack.submit(fault_cfg)
    stack.wait_stage0(run_id, "fitting")
    stack.kill_group("scorer")
    try:
        run = stack.wait_run(run_id, timeout=90)
        assert run["status"] == "failed", run
        assert "unreachable" in run["error"] and f"after {SCORER_RETRIES} retries" in run["error"]
        assert run["stages"][0]["state"] == "failed"
        assert run["stages"][0]["metrics"]["scorer_wait"]["state"] == "gave up"
    finally:
        stack.start("scorer")
        stack.ready("scorer")


def test_a_task_that_kills_its_worker_every_time_fails_the_run(stack, fault_cfg):
    """Poison message: the fit's pool process is killed on every delivery (an OOM killer
    stand-in); past MATES_TASK_MAX_DELIVERIES the run fails instead of looping forever."""
    run_id = stack.submit(fault_cfg)
    stack.wait_stage0(run_id, "probing")

    def fit_deliveries() -> int:
        return sum(
            d["count"]
            for d in stack.store.list_deliveries(run_id)
            if d["task"] == "mates.fit_influence_model"
        )

    killed = 0
    end = time.monotonic() + 120
    while stack.store.get_run(run_id)["status"] not in TERMINAL:
        assert time.monotonic() < end, stack.logs()
        if killed < fit_deliveries() <= MAX_DELIVERIES:
            for pid in stack.pool_children():
                os.kill(pid, signal.SIGKILL)
            killed += 1
        time.sleep(0.02)
    run = stack.run(run_id)
    assert run["status"] == "failed", run
    assert f"delivered {MAX_DELIVERIES + 1} times" in run["error"]
    assert run["stages"][0]["state"] == "failed"
    assert killed == MAX_DELIVERIES
    assert stack.client.get("/v1/models", params={"run_id": run_id}).json() == []
    assert stack.procs["worker"].alive()  # the worker itself survived every loss
