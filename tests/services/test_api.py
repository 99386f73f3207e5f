"""The control plane through FastAPI's TestClient, with a real Redis as the Celery broker.

No worker consumes the queues here: a submitted run is checked by the Celery message
it leaves on the `train` list in Redis.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from procs import free_port, serving

from mates.artifacts import RunPaths, read_json, write_json
from mates.manifest import Manifest
from services.api.app import create_app
from services.common.settings import PLACEHOLDER_KEY, Settings

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_settings(tmp_path: Path, redis_url: str, **over) -> Settings:
    values = {
        "api_key": KEY,
        "dev": False,
        "database_url": f"sqlite:///{tmp_path}/db/runs.db",
        "artifacts_dir": tmp_path / "artifacts",
        "broker_url": redis_url,
        "scorer_url": f"http://127.0.0.1:{free_port()}",
        "http_timeout_s": 5.0,
    }
    return Settings(**{**values, **over})


@pytest.fixture
def broker(redis_url):
    """The test Redis, emptied; dispatch sends there through `celery_app.app_for(settings)`."""
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    yield r
    r.close()


def make_client(settings: Settings):
    return TestClient(create_app(settings))


@pytest.fixture
def settings(tmp_path, redis_url):
    return make_settings(tmp_path, redis_url)


@pytest.fixture
def client(settings, broker):
    with make_client(settings) as c:
        yield c


@pytest.fixture
def valid_config(tiny_config_factory):
    return tiny_config_factory().model_dump(mode="json")


def hand_made_run(client: TestClient, root: Path, status: str, run_id: str = "hand-0001") -> str:
    """A run written to the store and artifact store directly, in the given status."""
    m = Manifest.create(RunPaths(root / run_id).manifest, {"name": "hand"}, "fp", 2, run_id=run_id)
    store = client.app.state.store
    store.create_run(m.data, str(m.path.parent))
    store.set_status(run_id, status)
    return run_id


def train_messages(broker) -> list[dict]:
    return [json.loads(raw) for raw in broker.lrange("train", 0, -1)]


# --------------------------------------------------------------------------- submit


def test_submit_creates_the_run_and_queues_stage_0(client, broker, valid_config):
    r = client.post("/v1/runs", json=valid_config, headers=AUTH)
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["status"] == "queued" and run["name"] == "tiny" and run["num_stages"] == 3
    assert run["generation"] == 1 and [s["state"] for s in run["stages"]] == ["pending"] * 3
    assert Path(run["artifacts_dir"], "run.json").is_file()

    assert broker.llen("train") == 1
    msg = train_messages(broker)[0]
    assert msg["headers"]["task"] == "mates.train_stage"
    assert msg["headers"]["argsrepr"] == repr((run["id"], 0, 1))

    shown = client.get(f"/v1/runs/{run['id']}").json()
    assert shown["id"] == run["id"] and shown["config"]["selection"]["ratio"] == 0.2
    listed = client.get("/v1/runs").json()
    assert [x["id"] for x in listed] == [run["id"]] and listed[0]["stage_state"] == "pending"
    assert client.get("/v1/runs", params={"status": "queued"}).json()[0]["id"] == run["id"]
    assert client.get("/v1/runs", params={"status": "done"}).json() == []


def test_bad_config_is_422_naming_the_field(client, broker, valid_config):
    valid_config["selection"]["ratio"] = 1.5
    r = client.post("/v1/runs", json=valid_config, headers=AUTH)
    assert r.status_code == 422
    assert "`selection.ratio`" in r.json()["detail"] and "1.5" in r.json()["detail"]

    valid_config["selection"]["ratio"] = 0.2
    valid_config["train"]["learning_rate"] = 0.1
    r = client.post("/v1/runs", json=valid_config, headers=AUTH)
    assert r.status_code == 422 and "`train.learning_rate`" in r.json()["detail"]
    assert broker.llen("train") == 0 and client.get("/v1/runs").json() == []


def test_missing_data_file_is_422_naming_field_and_path(client, broker, valid_config, tmp_path):
    missing = tmp_path / "nowhere" / "heldout.jsonl"
    valid_config["data"]["heldout"] = str(missing)
    r = client.post("/v1/runs", json=valid_config, headers=AUTH)
    assert r.status_code == 422
    assert "`data.heldout`" in r.json()["detail"] and str(missing) in r.json()["detail"]
    assert broker.llen("train") == 0


def test_a_broker_failure_is_503_and_leaves_a_resumable_run(tmp_path, redis_url, valid_config):
    """Nothing listens on the broker port: the submit fails fast with 503, and the run it
    created is recorded failed (not stuck queued), so it can be resumed later."""
    settings = make_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    with make_client(settings) as c:
        r = c.post("/v1/runs", json=valid_config, headers=AUTH)
        assert r.status_code == 503, r.text
        assert "could not enqueue train_stage" in r.json()["detail"]
        runs = c.get("/v1/runs").json()
        assert [run["status"] for run in runs] == ["failed"]
        assert "could not enqueue" in runs[0]["error"]
        again = c.post(f"/v1/runs/{runs[0]['id']}/resume", headers=AUTH)
        assert again.status_code == 503  # still down, still resumable
        assert c.get(f"/v1/runs/{runs[0]['id']}").json()["status"] == "failed"


@pytest.mark.parametrize("field", ["pool", "reference", "heldout", "tokenizer"])
def test_a_nul_byte_in_a_data_path_is_422_not_500(client, broker, valid_config, field):
    valid_config["data"][field] = "data/evil\x00.jsonl"
    r = client.post("/v1/runs", json=valid_config, headers=AUTH)
    assert r.status_code == 422, r.text
    # the field is in `loc` too, not only in the message (issue 16)
    assert "`data" in r.json()["detail"] and r.json()["errors"][0]["loc"][:2] == ["body", "data"]
    assert broker.llen("train") == 0


def test_body_must_be_a_json_object(client, broker):
    assert client.post("/v1/runs", json=[1, 2], headers=AUTH).status_code == 422


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers, code, detail",
    [
        ({}, 401, "missing bearer API key"),
        ({"Authorization": f"Basic {KEY}"}, 401, "missing bearer API key"),
        ({"Authorization": "Bearer"}, 401, "missing bearer API key"),
        ({"Authorization": "Bearer wrong"}, 403, "invalid API key"),
        ({"Authorization": f"Bearer {KEY}x"}, 403, "invalid API key"),
        ({"Authorization": f"Bearer {KEY[:-1]}"}, 403, "invalid API key"),
    ],
    ids=["none", "basic", "empty", "wrong", "longer", "prefix"],
)
def test_posts_need_the_key(client, broker, valid_config, headers, code, detail):
    """401 without a bearer key (with `WWW-Authenticate`), 403 with a wrong one; nothing runs."""
    for path, body in (
        ("/v1/runs", valid_config),
        ("/v1/runs/x/cancel", None),
        ("/v1/runs/x/resume", None),
        ("/v1/score", {"model": "x/0", "documents": [{"id": "a", "text": "b"}]}),
    ):
        r = client.post(path, json=body, headers=headers)
        assert (r.status_code, r.json()["detail"]) == (code, detail), path
        assert ("www-authenticate" in r.headers) == (code == 401)
    assert broker.llen("train") == 0 and client.get("/v1/runs").json() == []


def test_reads_are_open_by_default_and_keyed_with_read_auth(tmp_path, redis_url, broker):
    with make_client(make_settings(tmp_path, redis_url)) as c:
        assert c.get("/v1/runs").status_code == 200
        assert c.get("/v1/models").status_code == 200
    with make_client(make_settings(tmp_path, redis_url, read_auth=True)) as c:
        for path in (
            "/v1/runs",
            "/v1/models",
            "/v1/runs/x",
            "/v1/runs/x/metrics",
            "/v1/runs/x/stages/0/selection",
        ):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 403, path
        assert c.get("/v1/runs", headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200  # probes stay open


def test_placeholder_key_is_refused_unless_dev(tmp_path, redis_url):
    with pytest.raises(SystemExit, match="placeholder"):
        create_app(make_settings(tmp_path, redis_url, api_key=PLACEHOLDER_KEY))
    with pytest.raises(SystemExit, match="empty"):
        create_app(make_settings(tmp_path, redis_url, api_key=""))
    create_app(make_settings(tmp_path, redis_url, api_key=PLACEHOLDER_KEY, dev=True))


# --------------------------------------------------------------------------- run control


def test_unknown_runs_are_404(client):
    for method, path in (
        ("get", "/v1/runs/nope"),
        ("post", "/v1/runs/nope/cancel"),
        ("post", "/v1/runs/nope/resume"),
        ("get", "/v1/runs/nope/metrics"),
        ("get", "/v1/runs/nope/stages/0/selection"),
    ):
        r = getattr(client, method)(path, headers=AUTH)
        assert r.status_code == 404, path
        assert "nope" in r.json()["detail"]


def test_cancel_and_resume_follow_the_run_state(client, broker, settings):
    done = hand_made_run(client, settings.artifacts_dir, "done")
    r = client.post(f"/v1/runs/{done}/cancel", headers=AUTH)
    assert r.status_code == 409 and "done" in r.json()["detail"]
    assert client.post(f"/v1/runs/{done}/resume", headers=AUTH).status_code == 409

    active = hand_made_run(client, settings.artifacts_dir, "running", run_id="hand-0002")
    r = client.post(f"/v1/runs/{active}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    assert RunPaths(settings.artifacts_dir / active).cancel.is_file()
    assert client.post(f"/v1/runs/{active}/resume", headers=AUTH).status_code == 409

    client.app.state.store.set_status(active, "cancelled")
    r = client.post(f"/v1/runs/{active}/resume", headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["generation"] == 1
    assert not RunPaths(settings.artifacts_dir / active).cancel.exists()
    assert [m["headers"]["argsrepr"] for m in train_messages(broker)] == [repr((active, 0, 1))]


def test_illegal_state_changes_are_409_with_the_reason(client, broker, settings):
    active = hand_made_run(client, settings.artifacts_dir, "running")
    assert client.post(f"/v1/runs/{active}/cancel", headers=AUTH).status_code == 202
    r = client.post(f"/v1/runs/{active}/cancel", headers=AUTH)  # twice
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"run {active} is cancelling; only an active run can be cancelled"
    )

    done = hand_made_run(client, settings.artifacts_dir, "done", run_id="hand-0002")
    r = client.post(f"/v1/runs/{done}/resume", headers=AUTH)
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"run {done} is done; only a failed or cancelled run can be resumed"
    )

    failed = hand_made_run(client, settings.artifacts_dir, "failed", run_id="hand-0003")
    assert client.post(f"/v1/runs/{failed}/resume", headers=AUTH).status_code == 202
    r = client.post(f"/v1/runs/{failed}/resume", headers=AUTH)  # twice: the first one won
    assert r.status_code == 409 and "is queued" in r.json()["detail"]
    assert client.get(f"/v1/runs/{failed}").json()["generation"] == 1
    assert len(train_messages(broker)) == 1


TRAVERSALS = [
    "%2e%2e",
    "%2E%2E%2Fetc%2Fpasswd",
    "..%5C..%5Cwindows",
    "%2fetc%2fpasswd",
    "a%00b",
    ".hidden",
    "-x",
    "x%20y",
    "r" * 129,
]


@pytest.mark.parametrize("run_id", TRAVERSALS)
def test_run_ids_that_could_escape_the_store_are_refused(client, settings, run_id):
    """404 (no route) or 422 (not a run ID) on every run route; nothing outside the store
    is read, whatever lies next to it."""
    (settings.artifacts_dir.parent / "run.json").write_text('{"secret": "outside"}')
    for method, suffix in (
        ("get", ""),
        ("get", "/metrics"),
        ("get", "/stages/0/selection"),
        ("post", "/cancel"),
        ("post", "/resume"),
    ):
        r = getattr(client, method)(f"/v1/runs/{run_id}{suffix}", headers=AUTH)
        assert r.status_code in (404, 422), (run_id, suffix, r.status_code)
        assert "outside" not in r.text
        if r.status_code == 422:
            assert r.json()["errors"][0]["loc"] == ["path", "run_id"]
    r = client.get("/v1/models", params={"run_id": "../x"})
    assert r.status_code == 422 and "`query.run_id`" in r.json()["detail"]


def test_wrong_query_and_path_types_are_422_naming_the_parameter(client, settings):
    run_id = hand_made_run(client, settings.artifacts_dir, "running")
    for path, params, field in (
        ("/v1/runs", {"limit": "ten"}, "`query.limit`"),
        ("/v1/runs", {"limit": 0}, "`query.limit`"),
        ("/v1/runs", {"offset": -1}, "`query.offset`"),
        ("/v1/runs", {"status": "sleeping"}, "`query.status`"),
        (f"/v1/runs/{run_id}/stages/one/selection", {}, "`path.stage`"),
    ):
        r = client.get(path, params=params)
        assert r.status_code == 422, (path, params)
        assert r.json()["detail"].startswith("invalid request: ") and field in r.json()["detail"]


# --------------------------------------------------------------------------- artifacts


def test_metrics_rows_and_stage_summaries(client, settings):
    run_id = hand_made_run(client, settings.artifacts_dir, "running")
    assert client.get(f"/v1/runs/{run_id}/metrics").json() == {
        "run_id": run_id,
        "rows": [],
        "stages": [{"stage": 0, "metrics": {}}, {"stage": 1, "metrics": {}}],
    }
    paths = RunPaths(settings.artifacts_dir / run_id)
    # two complete rows and one still being appended
    paths.metrics.write_text(
        '{"step": 0, "heldout_loss": 7.0}\n{"step": 10, "heldout_loss": NaN}\n{"step": 20, "held',
        encoding="utf-8",
    )
    m = Manifest.load(paths.manifest)
    m.on_save = client.app.state.store.sync_manifest
    m.update_metrics(0, tokens=640)
    body = client.get(f"/v1/runs/{run_id}/metrics").json()
    assert body["rows"] == [{"step": 0, "heldout_loss": 7.0}, {"step": 10, "heldout_loss": None}]
    assert body["stages"][0] == {"stage": 0, "metrics": {"tokens": 640}}


def test_selection_of_a_stage(client, settings):
    run_id = hand_made_run(client, settings.artifacts_dir, "running")
    r = client.get(f"/v1/runs/{run_id}/stages/5/selection")
    assert r.status_code == 404 and "no stage 5" in r.json()["detail"]
    r = client.get(f"/v1/runs/{run_id}/stages/1/selection")
    assert r.status_code == 404 and "no selection yet" in r.json()["detail"]
    assert "pending" in r.json()["detail"]
    selection = {"stage": 1, "method": "gumbel", "seed": 0, "ratio": 0.2, "ids": ["a", "b"]}
    write_json(RunPaths(settings.artifacts_dir / run_id).selection(1), selection)
    assert client.get(f"/v1/runs/{run_id}/stages/1/selection").json() == selection


def test_models_list(client, settings):
    run_id = hand_made_run(client, settings.artifacts_dir, "running")
    assert client.get("/v1/models").json() == []
    client.app.state.store.register_model(
        run_id, 0, "/m/0", {"val_spearman": 0.3, "val_pearson": 0.4, "train_size": 9, "val_size": 1}
    )
    models = client.get("/v1/models", params={"run_id": run_id}).json()
    assert [(m["version"], m["val_spearman"], m["num_probes"]) for m in models] == [
        (f"{run_id}/0", 0.3, 10)
    ]
    assert client.get("/v1/models", params={"run_id": "other"}).json() == []


# --------------------------------------------------------------------------- scoring


@pytest.fixture
def real_scorer(tiny_run):
    """The scorer service itself (uvicorn in a thread) over the tiny run's artifacts."""
    from services.scorer.app import create_app as create_scorer

    port = free_port()
    app = create_scorer(
        Settings(api_key=KEY, artifacts_dir=tiny_run["dir"].parent, scorer_port=port)
    )
    with serving(app, port) as url:
        yield url, read_json(RunPaths(tiny_run["dir"]).manifest)["run_id"]


def test_score_is_relayed_to_the_scorer(tmp_path, redis_url, real_scorer):
    import httpx

    url, run_id = real_scorer
    body = {
        "model": f"{run_id}/latest",
        "documents": [{"id": "b", "text": "Shares rose."}, {"id": "a", "text": "To be or not."}],
    }
    direct = httpx.post(f"{url}/v1/score", json=body, headers=AUTH, timeout=30)
    assert direct.status_code == 200, direct.text
    with make_client(make_settings(tmp_path, redis_url, scorer_url=url)) as c:
        r_found = c.post("/v1/score", json=body, headers=AUTH)
        r_missing = c.post("/v1/score", json={**body, "model": "nope/0"}, headers=AUTH)
        r_badkey = c.post("/v1/score", json=body, headers={"Authorization": "Bearer wrong"})
    assert r_found.status_code == 200, r_found.text
    assert r_found.json() == direct.json()
    assert [d["id"] for d in r_found.json()] == ["b", "a"]
    assert r_found.headers["X-Model-Version"] == direct.headers["X-Model-Version"] == f"{run_id}/1"
    assert r_missing.status_code == 404 and "nope" in r_missing.json()["detail"]
    assert "X-Model-Version" not in r_missing.headers
    assert r_badkey.status_code == 403


def test_a_scorer_refusing_the_apis_key_is_502_not_the_callers_fault(
    tmp_path, redis_url, real_scorer
):
    url, run_id = real_scorer
    body = {"model": f"{run_id}/latest", "documents": [{"id": "a", "text": "To be."}]}
    settings = make_settings(tmp_path, redis_url, scorer_url=url, api_key="another-key-98765")
    with make_client(settings) as c:
        r = c.post("/v1/score", json=body, headers={"Authorization": "Bearer another-key-98765"})
    assert r.status_code == 502
    assert "refused the API's key" in r.json()["detail"] and "another-key" not in r.text


def test_score_limits_and_empty_batches_through_the_api(tmp_path, redis_url, real_scorer):
    """The scorer's limits reach the caller as the scorer's 413; an empty batch is the
    API's own 422."""
    url, run_id = real_scorer
    many = [{"id": f"d{i}", "text": "x"} for i in range(1025)]  # MATES_SCORER_MAX_DOCUMENTS
    huge = [{"id": "big", "text": "y" * 100_001}]  # MATES_SCORER_MAX_CHARS
    with make_client(make_settings(tmp_path, redis_url, scorer_url=url)) as c:
        r_many = c.post("/v1/score", json={"model": f"{run_id}/0", "documents": many}, headers=AUTH)
        r_huge = c.post("/v1/score", json={"model": f"{run_id}/0", "documents": huge}, headers=AUTH)
        r_empty = c.post("/v1/score", json={"model": f"{run_id}/0", "documents": []}, headers=AUTH)
    assert r_many.status_code == 413 and "1025 documents" in r_many.json()["detail"]
    assert r_huge.status_code == 413 and "'big' has 100001 characters" in r_huge.json()["detail"]
    assert r_empty.status_code == 422
    assert "`body.documents`: documents must not be empty" in r_empty.json()["detail"]


def test_score_is_502_when_no_scorer_listens(client, settings):
    r = client.post(
        "/v1/score", json={"model": "x/0", "documents": [{"id": "a", "text": "b"}]}, headers=AUTH
    )
    assert r.status_code == 502
    assert "cannot be reached" in r.json()["detail"] and settings.scorer_url in r.json()["detail"]
    r = client.post("/v1/score", json={"model": "x/0", "documents": []}, headers=AUTH)
    assert r.status_code == 422


# --------------------------------------------------------------------------- health and docs


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"store": "ok", "broker": "ok"}


def test_readiness_names_the_broker_when_it_is_down(tmp_path, redis_url):
    bad = f"redis://127.0.0.1:{free_port()}/0"
    with make_client(make_settings(tmp_path, redis_url, broker_url=bad)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert "broker" in r.json()["detail"] and r.json()["checks"]["store"] == "ok"


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "MATES control plane" and spec["info"]["version"]
    assert {t["name"] for t in spec["tags"]} == {"runs", "models", "scoring", "health"}
    assert "/v1/runs/{run_id}/stages/{stage}/selection" in spec["paths"]
    ok = spec["paths"]["/v1/score"]["post"]["responses"]["200"]
    schema = ok["content"]["application/json"]["schema"]
    assert schema["type"] == "array" and schema["items"]["$ref"].endswith("/DocumentScore")
    assert "X-Model-Version" in ok["headers"]
    # every 422 is documented with the body the handler really returns
    problem = spec["components"]["schemas"]["HTTPValidationError"]
    assert problem["properties"]["detail"]["type"] == "string"
    assert set(problem["required"]) == {"detail", "errors"}
    assert set(spec["paths"]["/v1/runs/{run_id}/cancel"]["post"]["responses"]) >= {
        "202",
        "401",
        "403",
        "404",
        "409",
        "422",
    }


def test_a_bad_config_names_its_field_in_errors_loc(client, valid_config):
    """A program reads where the problem is from `errors[*].loc`, not from the message."""
    bad = {**valid_config, "selection": {**valid_config["selection"], "ratio": 1.5}}
    r = client.post("/v1/runs", json=bad, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["body", "selection", "ratio"]
    assert "`selection.ratio`" in r.json()["detail"]
    missing = {**valid_config, "data": {**valid_config["data"], "pool": "/nowhere/pool.jsonl"}}
    r = client.post("/v1/runs", json=missing, headers=AUTH)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "data", "pool"]


def test_the_published_schema_is_the_contract_in_each_mode(tmp_path, redis_url):
    """The run config is the request model; a read route declares the key (and its 401)
    only when MATES_READ_AUTH=1; OPTIONS on a path names every method it serves."""
    for read_auth in (False, True):
        app = create_app(make_settings(tmp_path / str(read_auth), redis_url, read_auth=read_auth))
        schema = app.openapi()
        body = schema["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/RunConfig"}
        config = schema["components"]["schemas"]["RunConfig"]
        assert {"data", "selection", "stages"} <= set(config["properties"])
        ratio = schema["components"]["schemas"]["SelectionConfig"]["properties"]["ratio"]
        assert ratio.get("exclusiveMinimum") == 0 or ratio.get("minimum") is not None
        for path in ("/v1/runs", "/v1/models"):
            op = schema["paths"][path]["get"]
            assert ("security" in op) is read_auth, (path, read_auth)
            assert ("401" in op["responses"]) is read_auth, (path, read_auth)
        score = schema["paths"]["/v1/score"]["post"]
        assert {"401", "403", "404", "413"} <= set(score["responses"])
        documents = schema["components"]["schemas"]["ScoreRequest"]["properties"]["documents"]
        assert documents["minItems"] == 1
        with TestClient(app) as c:
            r = c.options("/v1/runs")
            assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
