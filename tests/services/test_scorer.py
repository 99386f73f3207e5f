"""The scorer service: scoring equals the library's, model resolution, limits, auth, batching."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from mates.artifacts import RunPaths  # noqa: E402
from mates.influence import InfluenceScorer  # noqa: E402
from services.common.settings import PLACEHOLDER_KEY, Settings  # noqa: E402
from services.scorer import app as scorer_app  # noqa: E402
from services.scorer.batcher import Batcher  # noqa: E402
from services.scorer.cache import ModelCache  # noqa: E402
from services.scorer.errors import ShuttingDown  # noqa: E402
from services.scorer.registry import Version  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CPU = torch.device("cpu")

TEXTS = [
    "The market rose sharply after the report.",
    "Players won the match.",
    "The film star thanked fans for the award at a long ceremony that went on and on "
    "well past midnight, with speeches from the director, the producers and the cast.",
    "",
    "minister",
    "Shares of the company fell while the minister said nothing at all about it.",
    "A b c d e f g h i j k l m n o p q r s t u v w x y z " * 4,
]


def make_settings(root, **kw) -> Settings:
    base = dict(
        artifacts_dir=root,
        api_key=KEY,
        dev=False,
        read_auth=False,
        device="cpu",
        scorer_batch_docs=4,
        scorer_batch_wait_ms=2.0,
        scorer_cache_models=4,
    )
    return Settings(**{**base, **kw})


def docs(texts, prefix="d"):
    return [{"id": f"{prefix}{i}", "text": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def run_id(tiny_run) -> str:
    return tiny_run["manifest"]["run_id"]


@pytest.fixture(scope="module")
def expected(tiny_run):
    """What the library's own `predict` gives for TEXTS, by stage."""
    out = {}
    for k in (0, 1):
        scorer = InfluenceScorer.load(RunPaths(tiny_run["dir"]).influence_model(k), CPU)
        out[k] = scorer.predict(scorer.tokenize(TEXTS), batch_size=3)
    return out


@pytest.fixture(scope="module")
def client(tiny_run):
    app = scorer_app.create_app(make_settings(tiny_run["dir"].parent))
    with TestClient(app) as c:
        yield c


def scores_of(resp) -> np.ndarray:
    return np.array([s["score"] for s in resp.json()])


def assert_same_scores(actual, expected) -> None:
    """The service's scores are the library's up to float32 batching noise: its batches pad
    documents to other lengths, which reorders the encoder's fp32 sums (~1e-6 in a
    feature), and the fitted head scales that by its weights. Measured on the tiny run: up
    to 1.04e-4 on scores spread 0.2, so the bar is 0.1% of the scores' range, far below
    what could reorder a selection."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, atol=1e-3 * float(np.ptp(expected)), rtol=0)


def version_of(resp) -> str:
    return resp.headers["X-Model-Version"]


# --------------------------------------------------------------------------- scoring


def test_scores_equal_library_predict(client, run_id, expected):
    r = client.post(
        "/v1/score", headers=AUTH, json={"model": f"{run_id}/0", "documents": docs(TEXTS)}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert version_of(r) == f"{run_id}/0"
    assert isinstance(body, list) and all(set(row) == {"id", "score"} for row in body)
    assert [s["id"] for s in body] == [f"d{i}" for i in range(len(TEXTS))]
    assert_same_scores(scores_of(r), expected[0])


def test_latest_resolves_to_the_highest_stage(client, run_id, expected):
    r = client.post(
        "/v1/score", headers=AUTH, json={"model": f"{run_id}/latest", "documents": docs(TEXTS)}
    )
    assert r.status_code == 200, r.text
    assert version_of(r) == f"{run_id}/1"
    assert_same_scores(scores_of(r), expected[1])


def test_concurrent_requests_get_their_own_results(tiny_run, run_id, expected):
    # A long batch wait so that concurrent requests really share forward passes.
    app = scorer_app.create_app(
        make_settings(tiny_run["dir"].parent, scorer_batch_wait_ms=100.0, scorer_batch_docs=16)
    )
    n_requests = 8
    results: dict[int, object] = {}
    barrier = threading.Barrier(n_requests)

    with TestClient(app) as c:

        def call(i: int) -> None:
            stage, rows = i % 2, [(j, TEXTS[j]) for j in range(len(TEXTS)) if (j + i) % 3]
            body = {
                "model": f"{run_id}/{stage}",
                "documents": [{"id": f"r{i}-{j}", "text": t} for j, t in rows],
            }
            barrier.wait()
            results[i] = (stage, [j for j, _ in rows], c.post("/v1/score", headers=AUTH, json=body))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(n_requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = app.state.service.batcher.batches

    assert len(results) == n_requests
    for i, (stage, rows, r) in results.items():
        assert r.status_code == 200, r.text
        assert version_of(r) == f"{run_id}/{stage}"
        assert [s["id"] for s in r.json()] == [f"r{i}-{j}" for j in rows]
        assert_same_scores(scores_of(r), expected[stage][rows])
    assert batches < n_requests  # some requests shared a forward pass


# --------------------------------------------------------------------------- model resolution


def test_unknown_run_is_404(client):
    r = client.post(
        "/v1/score", headers=AUTH, json={"model": "no-such-run/0", "documents": docs(["x"])}
    )
    assert r.status_code == 404
    assert "no-such-run" in r.json()["detail"]
    assert "X-Model-Version" not in r.headers


@pytest.mark.parametrize("stage", [2, 7])
def test_stage_without_model_is_404(client, run_id, stage):
    r = client.post(
        "/v1/score", headers=AUTH, json={"model": f"{run_id}/{stage}", "documents": docs(["x"])}
    )
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert f"stage {stage}" in detail and run_id in detail


@pytest.mark.parametrize("model", ["no-slash", "run/", "/0", "run/abc", "run/-1", "run/1.5"])
def test_malformed_model_is_422(client, model):
    r = client.post("/v1/score", headers=AUTH, json={"model": model, "documents": docs(["x"])})
    assert r.status_code == 422
    assert repr(model) in r.json()["detail"]


@pytest.mark.parametrize(
    "model",
    [
        "../0",
        "../../etc/latest",
        "/etc/passwd/0",
        "..\\..\\x/0",
        "%2e%2e/0",
        "%2e%2e%2fetc/0",
        "run\x00id/0",
        "run id/0",
        ".hidden/0",
        "-run/0",
        "r" * 129 + "/0",
    ],
)
def test_model_names_that_could_escape_the_store_are_422(client, model):
    r = client.post("/v1/score", headers=AUTH, json={"model": model, "documents": docs(["x"])})
    assert r.status_code == 422, r.text
    assert "is not a run ID" in r.json()["detail"]
    assert "X-Model-Version" not in r.headers


def test_runs_are_found_by_the_id_in_their_manifest_not_by_directory(client, tiny_run):
    """The run's directory name is no handle on it: nothing is opened by a requested name."""
    r = client.post(
        "/v1/score",
        headers=AUTH,
        json={"model": f"{tiny_run['dir'].name}/0", "documents": docs(["x"])},
    )
    assert r.status_code == 404 and "unknown run" in r.json()["detail"]


def test_run_without_a_model_yet_is_409_and_found_by_rescan(tiny_run, run_id, tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    app = scorer_app.create_app(make_settings(root))
    with TestClient(app) as c:
        body = {"model": f"{run_id}/latest", "documents": docs(["x"])}
        assert c.post("/v1/score", headers=AUTH, json=body).status_code == 404
        # The run appears after the service started: a miss rescans the store.
        run_dir = root / "some-dir-name"
        run_dir.mkdir()
        shutil.copy(RunPaths(tiny_run["dir"]).manifest, RunPaths(run_dir).manifest)
        for model in (f"{run_id}/latest", f"{run_id}/0"):
            r = c.post("/v1/score", headers=AUTH, json={**body, "model": model})
            assert r.status_code == 409, r.text
            assert "no trained influence model yet" in r.json()["detail"]
            assert run_id in r.json()["detail"]
        # ...and a model fitted later is found too.
        shutil.copytree(
            RunPaths(tiny_run["dir"]).influence_model(0), RunPaths(run_dir).influence_model(0)
        )
        r = c.post("/v1/score", headers=AUTH, json=body)
        assert r.status_code == 200, r.text
        assert version_of(r) == f"{run_id}/0"


# --------------------------------------------------------------------------- limits and validation


def test_too_many_documents_is_413(tiny_run, run_id):
    app = scorer_app.create_app(make_settings(tiny_run["dir"].parent, scorer_max_documents=3))
    with TestClient(app) as c:
        r = c.post(
            "/v1/score", headers=AUTH, json={"model": f"{run_id}/0", "documents": docs("abcd")}
        )
    assert r.status_code == 413
    assert "4 documents" in r.json()["detail"] and "limit is 3" in r.json()["detail"]


def test_too_long_document_is_413(tiny_run, run_id):
    app = scorer_app.create_app(make_settings(tiny_run["dir"].parent, scorer_max_chars=10))
    with TestClient(app) as c:
        body = {
            "model": f"{run_id}/0",
            "documents": [{"id": "short", "text": "ok"}, {"id": "long-one", "text": "x" * 11}],
        }
        r = c.post("/v1/score", headers=AUTH, json=body)
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "'long-one'" in detail and "limit is 10" in detail


@pytest.mark.parametrize(
    "documents, problem, loc",
    [
        ([], "`body.documents`: documents must not be empty", ["body", "documents"]),
        (
            [{"id": "", "text": "a"}],
            "`body.documents.0.id`: document id must not be empty",
            ["body", "documents", 0, "id"],
        ),
        (
            [{"id": "a", "text": "a"}, {"id": "b", "text": "b"}, {"id": "a", "text": "c"}],
            "`body.documents`: duplicate document id 'a'",
            ["body", "documents"],
        ),
        ([{"id": "a"}], "`body.documents.0.text` is required", ["body", "documents", 0, "text"]),
        ([{"text": "a"}], "`body.documents.0.id` is required", ["body", "documents", 0, "id"]),
        (
            [{"id": "a", "text": 7}],
            "`body.documents.0.text`: Input should be a valid string, got 7",
            ["body", "documents", 0, "text"],
        ),
        (
            {"id": "a", "text": "b"},
            "`body.documents`: Input should be a valid list",
            ["body", "documents"],
        ),
    ],
)
def test_invalid_documents_are_422_naming_the_field(client, run_id, documents, problem, loc):
    """`detail` names the field for people; `errors` has the same for programs."""
    r = client.post(
        "/v1/score", headers=AUTH, json={"model": f"{run_id}/0", "documents": documents}
    )
    assert r.status_code == 422
    body = r.json()
    assert body["detail"].startswith("invalid request: ") and problem in body["detail"]
    assert [e["loc"] for e in body["errors"]] == [loc]
    assert set(body["errors"][0]) == {"loc", "msg", "type"}


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"documents": [{"id": "a", "text": "x"}]}, "`body.model` is required"),
        (
            {"model": 5, "documents": [{"id": "a", "text": "x"}]},
            "`body.model`: Input should be a valid string, got 5",
        ),
        ([1, 2], "`body`: Input should be a valid dictionary"),
    ],
)
def test_wrong_types_are_422_naming_the_field(client, body, problem):
    r = client.post("/v1/score", headers=AUTH, json=body)
    assert r.status_code == 422 and problem in r.json()["detail"], r.text


@pytest.mark.parametrize(
    "raw, problem",
    [
        (
            b'{"model": "r/0", "documents": [{"id": "a", "text": "caf\xe9"}]}',
            "`body` is not valid UTF-8 JSON",
        ),
        (b'{"model": "\xc3\x28/0", "documents": []}', "`body` is not valid UTF-8 JSON"),
        (b"\xff\xfe\x00{", "`body` is not valid JSON"),  # taken for UTF-16 by `json.loads`
        (b'{"model": "r/0", "documents": [', "`body` is not valid JSON"),
        (b"", "`body` is required"),
    ],
)
def test_undecodable_bodies_are_422(client, raw, problem):
    r = client.post("/v1/score", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert problem in r.json()["detail"] and r.json()["errors"][0]["loc"][0] == "body"


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers, code, detail",
    [
        ({}, 401, "missing bearer API key"),
        ({"Authorization": f"Token {KEY}"}, 401, "missing bearer API key"),
        ({"Authorization": "Bearer wrong-key"}, 403, "invalid API key"),
        ({"Authorization": f"Bearer {KEY.upper()}"}, 403, "invalid API key"),
    ],
)
def test_score_needs_the_key(client, run_id, headers, code, detail):
    r = client.post(
        "/v1/score", headers=headers, json={"model": f"{run_id}/0", "documents": docs(["x"])}
    )
    assert r.status_code == code
    assert r.json()["detail"] == detail
    assert "X-Model-Version" not in r.headers


def test_placeholder_key_is_refused_outside_dev(tiny_run, monkeypatch):
    root = tiny_run["dir"].parent
    with pytest.raises(SystemExit, match="placeholder"):
        scorer_app.create_app(make_settings(root, api_key=PLACEHOLDER_KEY))
    monkeypatch.setattr(scorer_app.uvicorn, "run", lambda *a, **kw: pytest.fail("served"))
    with pytest.raises(SystemExit, match="placeholder"):
        scorer_app.serve(make_settings(root, api_key=PLACEHOLDER_KEY))


def test_placeholder_key_is_allowed_in_dev(tiny_run, run_id, monkeypatch):
    settings = make_settings(tiny_run["dir"].parent, api_key=PLACEHOLDER_KEY, dev=True)
    with TestClient(scorer_app.create_app(settings)) as c:
        r = c.post(
            "/v1/score",
            headers={"Authorization": f"Bearer {PLACEHOLDER_KEY}"},
            json={"model": f"{run_id}/0", "documents": docs(["x"])},
        )
    assert r.status_code == 200, r.text
    served = {}
    monkeypatch.setattr(scorer_app.uvicorn, "run", lambda app, **kw: served.update(kw))
    scorer_app.serve(settings)
    assert served == {"host": settings.scorer_host, "port": settings.scorer_port}


# --------------------------------------------------------------------------- listing and health


def test_models_lists_versions_with_fit(client, run_id, tiny_run):
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    mine = [m for m in r.json() if m["run_id"] == run_id]
    assert [m["version"] for m in mine] == [f"{run_id}/0", f"{run_id}/1"]
    assert [m["stage"] for m in mine] == [0, 1]
    assert mine[0]["path"] == str(RunPaths(tiny_run["dir"]).influence_model(0))
    assert all("val_spearman" in m["fit"] for m in mine)


def test_models_needs_the_key_with_read_auth(tiny_run):
    app = scorer_app.create_app(make_settings(tiny_run["dir"].parent, read_auth=True))
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert c.get("/v1/models", headers=AUTH).status_code == 200
        assert c.get("/readyz").status_code == 200  # probes stay open


def test_openapi_documents_the_score_list_and_header(client):
    ok = client.get("/openapi.json").json()["paths"]["/v1/score"]["post"]["responses"]["200"]
    schema = ok["content"]["application/json"]["schema"]
    assert schema["type"] == "array" and schema["items"]["$ref"].endswith("/DocumentScore")
    assert "<run_id>/<stage>" in ok["headers"]["X-Model-Version"]["description"]


def test_health_and_readiness(client, tmp_path):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    app = scorer_app.create_app(make_settings(tmp_path / "store"))
    with TestClient(app) as c:
        assert (tmp_path / "store").is_dir()  # an empty store is created, and ready
        assert c.get("/readyz").status_code == 200
        (tmp_path / "store").rmdir()  # e.g. a volume that went away
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503
        assert "does not exist" in r.json()["detail"]
        (tmp_path / "store").mkdir()
        assert c.get("/readyz").status_code == 200
        app.state.service.batcher.stop()
        r = c.get("/readyz")
        assert r.status_code == 503 and "model thread" in r.json()["detail"]


# --------------------------------------------------------------------------- cache and batcher


def test_lru_cache_of_size_one_evicts(tiny_run, run_id, expected):
    app = scorer_app.create_app(make_settings(tiny_run["dir"].parent, scorer_cache_models=1))
    with TestClient(app) as c:
        cache = app.state.service.cache
        for n, stage in enumerate((0, 0, 1, 0), start=1):
            r = c.post(
                "/v1/score",
                headers=AUTH,
                json={"model": f"{run_id}/{stage}", "documents": docs(TEXTS)},
            )
            assert r.status_code == 200, r.text
            assert_same_scores(scores_of(r), expected[stage])
            assert cache.versions() == [f"{run_id}/{stage}"]
            assert cache.loads == [1, 1, 2, 3][n - 1]


def test_cache_keeps_the_most_recently_used(tmp_path):
    loaded = []

    def loader(path, device):
        loaded.append(path.name)
        return object()

    cache = ModelCache(2, CPU, loader=loader)
    a, b, c = (Version("run", k, tmp_path / f"m{k}") for k in range(3))
    cache.get(a)
    cache.get(b)
    cache.get(a)  # a is now the most recent
    cache.get(c)  # evicts b
    assert cache.versions() == ["run/0", "run/2"]
    cache.get(b)
    assert loaded == ["m0", "m1", "m2", "m1"]


class FakeModel:
    """Scores a document by its first token; records the calls."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def predict(self, token_lists, batch_size):
        self.calls.append((len(token_lists), batch_size))
        if self.fail:
            raise RuntimeError("device on fire")
        return np.array([float(t[0]) for t in token_lists])


def test_batcher_combines_jobs_per_model_and_keeps_order():
    batcher = Batcher(max_docs=100, wait_s=0.2)
    batcher.start()
    try:
        m1, m2 = FakeModel(), FakeModel()
        futures = [
            batcher.submit(m1, [[1], [2]]),
            batcher.submit(m2, [[3]]),
            batcher.submit(m1, [[4], [5], [6]]),
        ]
        got = [f.result(timeout=5).tolist() for f in futures]
    finally:
        batcher.stop()
    assert got == [[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]]
    assert m1.calls == [(5, 100)] and m2.calls == [(1, 100)]
    assert not batcher.alive()


def test_batcher_stops_gathering_at_max_docs():
    batcher = Batcher(max_docs=3, wait_s=0.2)
    model = FakeModel()
    futures = [batcher.submit(model, [[i], [i]]) for i in range(3)]  # before start: refused
    assert all(isinstance(f.exception(timeout=1), ShuttingDown) for f in futures)
    batcher.start()
    try:
        t0 = time.monotonic()
        futures = [batcher.submit(model, [[i], [i]]) for i in range(3)]
        assert [f.result(timeout=5).tolist() for f in futures] == [[i, i] for i in range(3)]
    finally:
        batcher.stop()
    # 2 + 2 documents fill a pass of 3, the last job waits for the next one
    assert model.calls == [(4, 3), (2, 3)]
    assert time.monotonic() - t0 < 5


def test_batcher_reports_errors_and_lives_on():
    batcher = Batcher(max_docs=8, wait_s=0.0)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="device on fire"):
            batcher.submit(FakeModel(fail=True), [[1]]).result(timeout=5)
        assert batcher.alive()
        assert batcher.submit(FakeModel(), [[7]]).result(timeout=5).tolist() == [7.0]
    finally:
        batcher.stop()
    assert isinstance(batcher.submit(FakeModel(), [[1]]).exception(timeout=1), ShuttingDown)
