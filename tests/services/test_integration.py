"""The services end to end: real Redis, uvicorn (api, scorer) and Celery (trainer, worker).

The tiny config is submitted over HTTP, watched to `done`, and its selections are
compared with the embedded run of the same config (`tiny_run`): one pipeline, two
ways to run it, the same documents. Every process is started here on loopback
ports and stopped by PID.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

pytest.importorskip("celery")
pytest.importorskip("fastapi")

import httpx  # noqa: E402
import redis  # noqa: E402
from procs import free_port, mates_serve, wait_http  # noqa: E402

from mates.artifacts import RunPaths, read_json  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "integration-key-0123456789"
TERMINAL = ("done", "failed", "cancelled")
STAGE0_PATH = ["pending", "training", "probing", "fitting", "scoring", "selecting", "done"]


def _db_url(redis_url: str, db: int) -> str:
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.fixture(scope="module")
def stack(redis_url, tmp_path_factory):
    """api + scorer (uvicorn) and trainer + worker (Celery) over one Redis database."""
    from services.common.queue import make_celery
    from services.common.settings import Settings

    base = tmp_path_factory.mktemp("stack")
    broker = _db_url(redis_url, 14)  # its own database: nothing else's messages in its queues
    redis.Redis.from_url(broker).flushdb()
    api_port, scorer_port = free_port(), free_port()
    env = {
        **os.environ,
        "MATES_API_KEY": KEY,
        "MATES_DATABASE_URL": f"sqlite:///{base / 'runs.db'}",
        "MATES_BROKER_URL": broker,
        "MATES_ARTIFACTS_DIR": str(base / "artifacts"),
        "MATES_API_PORT": str(api_port),
        "MATES_SCORER_PORT": str(scorer_port),
        "MATES_SCORER_URL": f"http://127.0.0.1:{scorer_port}",
        "MATES_SCORE_MODE": "http",
        "MATES_THREADS": "1",
        "MATES_WORKER_CONCURRENCY": "2",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    procs = []
    try:
        for kind in ("scorer", "api", "trainer", "worker"):
            procs.append(mates_serve(kind, env, base))
        api = f"http://127.0.0.1:{api_port}"
        wait_http(f"http://127.0.0.1:{scorer_port}/readyz", procs)
        wait_http(f"{api}/readyz", procs)
        celery = make_celery(Settings(broker_url=broker, api_key=KEY))
        _wait_workers(celery, procs)
        yield {
            "api": api,
            "procs": procs,
            "celery": celery,
            "base": base,
            "client": httpx.Client(
                base_url=api, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
            ),
        }
    finally:
        for p in reversed(procs):
            p.stop()


def _wait_workers(celery, procs, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
        names = {n for reply in celery.control.ping(timeout=1.0) for n in reply}
        if any(n.startswith("trainer") for n in names) and any(
            n.startswith("worker") for n in names
        ):
            return
    raise TimeoutError("celery workers did not answer:\n" + "\n".join(p.tail() for p in procs))


def _watch(
    stack, run_id: str, until=TERMINAL, timeout: float = 300.0, seen: list | None = None
) -> dict:
    """Poll GET /v1/runs/{id} until its status is in `until`; record every state seen."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = stack["client"].get(f"/v1/runs/{run_id}")
        assert r.status_code == 200, r.text
        run = r.json()
        if seen is not None:
            seen.append((run["status"], tuple(st["state"] for st in run["stages"])))
        if run["status"] in until:
            return run
        for p in stack["procs"]:
            assert p.alive(), p.tail()
        time.sleep(0.25)
    logs = "\n".join(p.tail() for p in stack["procs"])
    raise AssertionError(f"run {run_id} stayed {run['status']} for {timeout:.0f}s:\n{logs}")


def test_tiny_run_through_the_services_matches_the_embedded_run(
    stack, tiny_config_factory, tiny_run
):
    client = stack["client"]
    cfg = tiny_config_factory()
    r = client.post("/v1/runs", json=cfg.model_dump(mode="json"))
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    seen: list = []
    run = _watch(stack, run_id, seen=seen)
    assert run["status"] == "done", (run, "\n".join(p.tail() for p in stack["procs"]))

    # every stage reached done through the state machine, each transition timestamped
    n = cfg.stages.num_stages
    stages = run["stages"]
    assert [st["state"] for st in stages] == ["done"] * n
    for k, st in enumerate(stages):
        states = [t["state"] for t in st["transitions"]]
        assert states == (STAGE0_PATH if k < n - 1 else ["pending", "training", "done"]), (
            k,
            states,
        )
        ats = [t["at"] for t in st["transitions"]]
        assert ats == sorted(ats)
        assert st["timings"]["training"] > 0
    assert {"training", "probing", "fitting", "scoring", "selecting"} <= set(stages[0]["timings"])
    assert any(states[0] == "training" for _, states in seen)  # watched while it trained

    # the same selections as the embedded run of the same config and seed
    embedded = RunPaths(tiny_run["dir"])
    for k in range(n):
        sel = client.get(f"/v1/runs/{run_id}/stages/{k}/selection")
        assert sel.status_code == 200, sel.text
        body = sel.json()
        assert body["ids"] == read_json(embedded.selection(k))["ids"], k
        assert body["model_version"] == (f"{run_id}/{k - 1}" if k else None)

    # model versions registered once each, with their validation Spearman
    models = client.get("/v1/models", params={"run_id": run_id}).json()
    assert sorted(m["version"] for m in models) == [f"{run_id}/{k}" for k in range(n - 1)]
    assert all("val_spearman" in m for m in models)

    metrics = client.get(f"/v1/runs/{run_id}/metrics")
    assert metrics.status_code == 200 and metrics.text

    # on-demand scoring of arbitrary documents, through the API to the scorer
    docs = [
        {"id": "a", "text": "The minister said the markets rose after the report."},
        {"id": "b", "text": "To be, or not to be: that is the question."},
        {"id": "c", "text": "zq xv 1234 lorem ipsum ### !!"},
    ]
    s = client.post("/v1/score", json={"model": f"{run_id}/latest", "documents": docs})
    assert s.status_code == 200, s.text
    scores = s.json()
    assert [d["id"] for d in scores] == ["a", "b", "c"]
    assert all(isinstance(d["score"], float) for d in scores)
    assert s.headers["X-Model-Version"] == f"{run_id}/{n - 2}"

    # a re-delivered fit or select does no duplicate work and registers no second version
    gen = _generation(stack, run_id)
    before = read_json(RunPaths(stack["base"] / "artifacts" / run_id).selection(1))
    for name in ("mates.fit_influence_model", "mates.select"):
        res = stack["celery"].send_task(name, args=(run_id, 0, gen))
        assert res.get(timeout=60) in ("done already", "selected")
    assert read_json(RunPaths(stack["base"] / "artifacts" / run_id).selection(1)) == before
    assert len(client.get("/v1/models", params={"run_id": run_id}).json()) == n - 1
    paths = RunPaths(stack["base"] / "artifacts" / run_id)
    exported = (paths.export() / "config.json").stat().st_mtime_ns
    res = stack["celery"].send_task("mates.train_stage", args=(run_id, n - 1, gen))
    assert res.get(timeout=60) == "last"
    assert (paths.export() / "config.json").stat().st_mtime_ns == exported  # not exported twice
    again = client.get(f"/v1/runs/{run_id}").json()
    assert again["status"] == "done"
    assert [len(st["transitions"]) for st in again["stages"]] == [
        len(st["transitions"]) for st in stages
    ]

    # every stage done but the export failed (say, a full disk): a resume finishes the run
    import shutil

    from mates.manifest import Manifest
    from services.common.store import Store

    shutil.rmtree(paths.export())
    m = Manifest.load(paths.manifest)
    m.on_save = Store(f"sqlite:///{stack['base'] / 'runs.db'}").sync_manifest
    m.set_status("failed", "stage 2 failed: OSError: No space left on device")
    r = client.post(f"/v1/runs/{run_id}/resume")
    assert r.status_code == 202, r.text
    assert _watch(stack, run_id, timeout=120)["status"] == "done"
    assert (paths.export() / "config.json").is_file()


def _generation(stack, run_id: str) -> int:
    from services.common.store import Store

    return Store(f"sqlite:///{stack['base'] / 'runs.db'}").get_generation(run_id)


def test_cancel_then_resume_through_the_api(stack, tiny_config_factory):
    client = stack["client"]
    cfg = tiny_config_factory(
        "name=cancelme", "stages.stage0_steps=400", "train.eval_every_steps=50"
    )
    run_id = client.post("/v1/runs", json=cfg.model_dump(mode="json")).json()["id"]
    end = time.monotonic() + 120
    while client.get(f"/v1/runs/{run_id}").json()["stages"][0]["state"] != "training":
        assert time.monotonic() < end, "stage 0 never started training"
        time.sleep(0.1)
    r = client.post(f"/v1/runs/{run_id}/cancel")
    assert r.status_code == 202, r.text
    run = _watch(stack, run_id, until=("cancelled", "failed", "done"), timeout=120)
    assert run["status"] == "cancelled", run
    assert run["stages"][0]["state"] == "cancelled"
    assert client.post(f"/v1/runs/{run_id}/cancel").status_code == 409

    r = client.post(f"/v1/runs/{run_id}/resume")
    assert r.status_code == 202, r.text
    run = _watch(stack, run_id, timeout=300)
    assert run["status"] == "done", run
    states = [t["state"] for t in run["stages"][0]["transitions"]]
    assert states[:4] == ["pending", "training", "cancelled", "training"]
    assert client.post(f"/v1/runs/{run_id}/resume").status_code == 409
