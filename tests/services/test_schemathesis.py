"""Property-based tests of the API and the scorer from their own OpenAPI documents:
schemathesis generates valid and invalid requests for every operation, sends them with
the API key to real uvicorn servers on loopback; no answer may be a 5xx, and every answer
passes all of schemathesis' checks (the published schema is the contract).

The API relays `/v1/score` to a real scorer over the tiny run's artifacts, so scoring
requests reach the model too; runs submitted by a generated request would go to the
test Redis (none can be valid: their data files do not exist). Examples per operation
are bounded to keep the whole module near a minute on 2 cores.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
import schemathesis.specs.openapi.checks  # noqa: F401  (registers the OpenAPI checks)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from procs import serving
from schemathesis import GenerationMode

from services.api.app import create_app as create_api
from services.common.settings import Settings
from services.scorer.app import create_app as create_scorer

KEY = "fuzz-key-0123456789"
MAX_EXAMPLES = int(
    os.environ.get("MATES_FUZZ_EXAMPLES", "150")
)  # per operation; more for a deep run


@pytest.fixture(scope="module")
def scorer_url(tiny_run):
    settings = Settings(
        api_key=KEY, artifacts_dir=tiny_run["dir"].parent, device="cpu", scorer_batch_wait_ms=0.0
    )
    with serving(create_scorer(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def api_url(tmp_path_factory, redis_url, scorer_url):
    tmp = tmp_path_factory.mktemp("fuzz-api")
    settings = Settings(
        api_key=KEY,
        database_url=f"sqlite:///{tmp}/runs.db",
        artifacts_dir=tmp / "artifacts",
        broker_url=redis_url,
        scorer_url=scorer_url,
        http_timeout_s=30.0,
    )
    with serving(create_api(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(api_url):
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


@pytest.fixture(scope="module")
def scorer_schema(scorer_url):
    return schemathesis.openapi.from_url(f"{scorer_url}/openapi.json")


# Every operation by name, so each is its own test; a new route must be added here
# (`test_every_operation_is_fuzzed` fails until it is).
API_OPERATIONS = [
    "POST /v1/runs",
    "GET /v1/runs",
    "GET /v1/runs/{run_id}",
    "POST /v1/runs/{run_id}/cancel",
    "POST /v1/runs/{run_id}/resume",
    "GET /v1/runs/{run_id}/metrics",
    "GET /v1/runs/{run_id}/stages/{stage}/selection",
    "GET /v1/models",
    "POST /v1/score",
    "GET /healthz",
    "GET /readyz",
]
SCORER_OPERATIONS = ["POST /v1/score", "GET /v1/models", "GET /healthz", "GET /readyz"]


ALL_CHECKS = list(schemathesis.checks.CHECKS.get_all())  # after the OpenAPI checks registered
# What no JSON Schema can say, so a schema-valid request may still be refused with 422:
# a run config's data files must exist on the server (and some settings depend on others);
# the documents of a score request need unique IDs (`uniqueItems` covers only whole items).
POSITIVE_ONLY_BY_SCHEMA = [c for c in ALL_CHECKS if c.__name__ == "positive_data_acceptance"]
EXCLUDED = {"POST /v1/runs": POSITIVE_ONLY_BY_SCHEMA, "POST /v1/score": POSITIVE_ONLY_BY_SCHEMA}


def _labels(schema) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, methods in schema.raw_schema["paths"].items()
        for method in methods
    }


def test_every_operation_is_fuzzed(api_schema, scorer_schema):
    names = {c.__name__ for c in ALL_CHECKS}
    assert {"response_schema_conformance", "positive_data_acceptance", "ignored_auth"} <= names
    assert _labels(api_schema) == set(API_OPERATIONS)
    assert _labels(scorer_schema) == set(SCORER_OPERATIONS)


def fuzz(schema, label: str, real_model: str) -> set[int]:
    """`MAX_EXAMPLES` valid and invalid requests to one operation, each with the key; the
    status codes seen. Half the scoring requests name the tiny run's real model, so the
    generated documents go through the tokenizer and the model too."""
    method, path = label.split(" ", 1)
    operation = schema[path][method.lower()]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )
    seen: set[int] = set()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize="MATES_FUZZ_EXAMPLES" not in os.environ,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=cases, use_real_model=st.booleans())
    def no_server_error(case, use_real_model: bool) -> None:
        # a negative case may be invalid in its `model` alone: only a positive one is
        # pointed at the real model (which keeps it valid)
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if use_real_model and positive and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = real_model
        response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        seen.add(response.status_code)
        assert response.status_code < 500, (
            f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
        )
        # every check schemathesis has: status codes, content types, headers and bodies
        # conform to the published schema, schema-invalid input is refused, schema-valid
        # input accepted, an operation that takes the key refuses a request without it
        case.validate_response(
            response,
            checks=ALL_CHECKS,
            excluded_checks=EXCLUDED.get(label, []),
            headers={"Authorization": f"Bearer {KEY}"},
        )
        if response.status_code == 422:  # the one 422 shape: a message naming the field + a list
            body = response.json()
            assert isinstance(body["detail"], str) and isinstance(body["errors"], list), body

    no_server_error()
    return seen


@pytest.fixture(scope="module")
def real_model(tiny_run) -> str:
    return f"{tiny_run['manifest']['run_id']}/latest"


@pytest.mark.parametrize("label", API_OPERATIONS)
def test_api_never_answers_5xx(api_schema, label, real_model):
    seen = fuzz(api_schema, label, real_model)
    if label == "POST /v1/score":  # relayed to the scorer, valid and invalid
        assert 200 in seen and 422 in seen, seen


@pytest.mark.parametrize("label", SCORER_OPERATIONS)
def test_scorer_never_answers_5xx(scorer_schema, label, real_model):
    seen = fuzz(scorer_schema, label, real_model)
    if label == "POST /v1/score":
        assert 200 in seen and 422 in seen, seen
