"""The scorer load test: a short real run against a `mates serve scorer` it starts itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from helpers import REPO, TINY_CONFIG, write_jsonl  # noqa: E402

from services.loadtest import check_scores  # noqa: E402

TEXTS = [
    "Shares rose after the report.",
    "Players won the match.",
    "",
    "The minister said nothing at all about the long delays in the courts. " * 40,
]


def test_a_short_run_has_no_errors_and_stable_memory(tmp_path):
    docs = write_jsonl(
        tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    )
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.loadtest",
            "--config",
            str(TINY_CONFIG),
            "--docs",
            str(docs),
            "--clients",
            "4",
            "--seconds",
            "3",
            "--warmup-s",
            "1",
            "--docs-per-request",
            "6",
            "--rss-every-s",
            "0.5",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert "PASS" in proc.stdout and "requests/s" in proc.stdout
    assert r["passed"] and r["problems"] == []
    assert r["requests"] > 0 and r["ok"] == r["requests"]
    assert r["errors"] == {} and r["warmup"]["errors"] == {}
    assert r["docs_per_s"] == pytest.approx(r["requests_per_s"] * 6, rel=0.05)
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["versions"] == [r["model"]]
    rss = r["rss_mib"]
    assert rss["start"] > 0 and rss["end"] > 0 and len(rss["samples"]) >= 3
    assert rss["growth"] == pytest.approx(rss["end"] - rss["start"], abs=0.11)


def _response(rows, headers=None) -> httpx.Response:
    return httpx.Response(200, json=rows, headers={"X-Model-Version": "r/0", **(headers or {})})


@pytest.mark.parametrize(
    "rows, problem",
    [
        ([{"id": "a", "score": 0.1}, {"id": "b", "score": -1.0}], None),
        ([{"id": "a", "score": 0.1}], "ids"),
        ([{"id": "b", "score": 0.1}, {"id": "a", "score": 0.2}], "ids"),
        ([{"id": "a", "score": 0.1}, {"id": "b"}], "not a list"),
        ({"detail": "x"}, "not a list"),
        ([{"id": "a", "score": 0.1}, {"id": "b", "score": "nan"}], "not finite"),
    ],
)
def test_every_document_needs_its_own_score_in_order(rows, problem):
    got = check_scores(_response(rows), ["a", "b"])
    assert got is None if problem is None else problem in got


def test_the_model_version_header_is_required():
    resp = httpx.Response(200, json=[{"id": "a", "score": 0.0}])
    assert "X-Model-Version" in check_scores(resp, ["a"])
