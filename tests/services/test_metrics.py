"""`/metrics` on real uvicorn servers of the API and the scorer, scraped over HTTP and read
with prometheus_client's own text parser.

The scorer serves the tiny run's model, so batch sizes, documents scored and the model
cache's hits and loads come from real scoring; the API relays to it, reads the run store
and the test Redis (a task message is put on a queue by hand to be counted).
"""

from __future__ import annotations

import httpx
import pytest
import redis
from procs import serving
from prometheus_client.parser import text_string_to_metric_families

from mates.manifest import Manifest
from services.api.app import create_app as create_api
from services.common.settings import Settings
from services.scorer.app import create_app as create_scorer

KEY = "metrics-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def scorer_url(tiny_run):
    settings = Settings(api_key=KEY, artifacts_dir=tiny_run["dir"].parent, device="cpu")
    with serving(create_scorer(settings)) as url:
        yield url


@pytest.fixture
def api(tmp_path, redis_url, scorer_url):
    settings = Settings(
        api_key=KEY,
        database_url=f"sqlite:///{tmp_path}/runs.db",
        artifacts_dir=tmp_path / "artifacts",
        broker_url=redis_url,
        scorer_url=scorer_url,
    )
    app = create_api(settings)
    with serving(app) as url:
        yield url, app


def test_scorer_metrics_count_what_it_scored(scorer_url, tiny_run):
    model = f"{tiny_run['manifest']['run_id']}/latest"
    docs = [{"id": str(i), "text": f"document number {i}"} for i in range(5)]
    before = scrape(scorer_url)
    for _ in range(3):
        r = httpx.post(
            f"{scorer_url}/v1/score", json={"model": model, "documents": docs}, headers=AUTH
        )
        assert r.status_code == 200
    assert (
        httpx.post(f"{scorer_url}/v1/score", json={"model": model, "documents": docs}).status_code
        == 401
    )
    after = scrape(scorer_url)

    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("mates_scorer_documents_total") == 15
    assert delta("mates_scorer_batch_documents_count") >= 1
    assert delta("mates_scorer_batch_documents_sum") == 15
    # one load at most (the first request), every later request a cache hit
    assert delta("mates_scorer_model_loads_total") <= 1
    assert delta("mates_scorer_model_cache_hits_total") >= 2
    ok = (("handler", "/v1/score"), ("method", "POST"), ("status", "200"))
    refused = (("handler", "/v1/score"), ("method", "POST"), ("status", "401"))
    assert delta("http_requests_total", ok) == 3 and delta("http_requests_total", refused) == 1
    latency = after[
        ("http_request_duration_seconds_count", (("handler", "/v1/score"), ("method", "POST")))
    ]
    assert latency >= 4


def test_api_metrics_show_queues_runs_and_requests(api, redis_url, tmp_path):
    url, app = api
    broker = redis.Redis.from_url(redis_url)
    broker.delete("fit")
    broker.lpush("fit", b"{}", b"{}")  # two task messages waiting
    store = app.state.store
    m = Manifest.create(tmp_path / "r" / "run.json", {"name": "m"}, "fp", 1, run_id="metrics-0001")
    store.create_run(m.data, str(m.path.parent))
    try:
        httpx.get(f"{url}/v1/runs", timeout=10)
        metrics = scrape(url)
    finally:
        broker.delete("fit")
        broker.close()
    assert metrics[("mates_queue_depth", (("queue", "fit"),))] == 2
    assert metrics[("mates_queue_depth", (("queue", "train"),))] == 0
    assert metrics[("mates_runs", (("status", "pending"),))] == 1
    assert metrics[("mates_runs", (("status", "done"),))] == 0
    listed = (("handler", "/v1/runs"), ("method", "GET"), ("status", "200"))
    assert metrics[("http_requests_total", listed)] >= 1
    assert not any(labels and dict(labels).get("handler") == "/metrics" for _, labels in metrics)


def test_metrics_take_the_read_key_when_reads_do(tmp_path, redis_url):
    settings = Settings(
        api_key=KEY,
        read_auth=True,
        database_url=f"sqlite:///{tmp_path}/runs.db",
        artifacts_dir=tmp_path / "artifacts",
        broker_url=redis_url,
    )
    for app in (create_api(settings), create_scorer(settings)):
        with serving(app) as url:
            assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
            assert scrape(url, AUTH)
