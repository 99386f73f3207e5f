"""The HTTP edge of the API and the scorer against hostile input, over real uvicorn
servers on loopback where the transport matters: bodies over the size limit (declared
or chunked) are refused before they are read, API keys never reach a log, CORS is off
unless configured, and the services bind to loopback by default."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from procs import free_port
from procs import serving as procs_serving
from pydantic import ValidationError

from services.api import app as api_app
from services.common.settings import Settings
from services.scorer import app as scorer_app

KEY = "sekrit-key-4f9a1c77"
WRONG = "wrong-key-0b3e55d2"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4096  # MATES_MAX_BODY_BYTES in these tests


def make_settings(tmp_path: Path, redis_url: str, **over) -> Settings:
    values = {
        "api_key": KEY,
        "dev": False,
        "database_url": f"sqlite:///{tmp_path}/runs.db",
        "artifacts_dir": tmp_path / "artifacts",
        "broker_url": redis_url,
        "device": "cpu",
        "scorer_url": f"http://127.0.0.1:{free_port()}",
        "http_timeout_s": 5.0,
        "max_body_bytes": LIMIT,
    }
    return Settings(**{**values, **over})


APPS = {"api": api_app.create_app, "scorer": scorer_app.create_app}


def serving(app, port: int, access_log: bool = False):
    """`app` on 127.0.0.1:`port` in a thread; its loggers left to pytest, at debug."""
    return procs_serving(app, port, log_config=None, access_log=access_log, log_level="debug")


def raw_exchange(
    port: int, head: bytes, body_parts: list[bytes] = (), timeout_s: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send a request head and some body bytes as given, then read the whole response
    (the server closes the connection); never sends more than `body_parts`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and hung up already: that is the point
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.fixture(params=sorted(APPS))
def live(request, tmp_path, redis_url):
    """(kind, port) of the API or the scorer under uvicorn with a 4 KiB body limit."""
    port = free_port()
    with serving(APPS[request.param](make_settings(tmp_path, redis_url)), port):
        yield request.param, port


def _head(path: str, *lines: str) -> bytes:
    return "\r\n".join(
        [
            f"POST {path} HTTP/1.1",
            "Host: 127.0.0.1",
            f"Authorization: Bearer {KEY}",
            "Content-Type: application/json",
            *lines,
            "",
            "",
        ]
    ).encode()


# --------------------------------------------------------------------------- body size


def test_a_declared_oversized_body_is_413_before_a_byte_of_it_is_sent(live):
    """Only the head goes out; the 413 comes back anyway: nothing was waited for or read."""
    _, port = live
    t0 = time.monotonic()
    code, headers, body = raw_exchange(port, _head("/v1/score", f"Content-Length: {50 * 2**20}"))
    assert code == 413 and time.monotonic() - t0 < 5
    assert headers["connection"] == "close"
    detail = json.loads(body)["detail"]
    assert f"a body of {50 * 2**20} bytes" in detail and f"limit of {LIMIT} bytes" in detail
    assert "MATES_MAX_BODY_BYTES" in detail


def test_a_chunked_body_is_cut_off_at_the_limit(live):
    """No Content-Length: the bytes are counted as they arrive and the request is refused
    once past the limit, although the client never sends the last chunk."""
    _, port = live
    chunk = b'{"model": "r/0", "documents": [' + b" " * 1000
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 8  # ~8 KiB, the terminating chunk never sent
    code, headers, body = raw_exchange(
        port, _head("/v1/score", "Transfer-Encoding: chunked"), parts
    )
    assert code == 413 and headers["connection"] == "close"
    assert json.loads(body)["detail"] == (
        f"the request body is over the limit of {LIMIT} bytes (MATES_MAX_BODY_BYTES)"
    )


def test_a_streamed_oversized_body_from_a_real_client_is_413(live):
    _, port = live

    def stream():
        for _ in range(64):
            yield b"x" * 1024

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        r = c.post("/v1/score", content=stream(), headers=AUTH)  # chunked: no Content-Length
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and "MATES_MAX_BODY_BYTES" in r.json()["detail"]


@pytest.mark.parametrize("kind", sorted(APPS))
def test_bodies_at_and_over_the_limit_in_process(kind, tmp_path, redis_url):
    """Exactly the limit is parsed (and refused for what it says); one byte more is 413."""
    with TestClient(APPS[kind](make_settings(tmp_path, redis_url))) as c:
        at = c.post("/v1/score", content=b" " * LIMIT, headers=AUTH)
        over = c.post("/v1/score", content=b" " * (LIMIT + 1), headers=AUTH)
        unauthenticated = c.post("/v1/score", content=b" " * (LIMIT + 1))
    assert at.status_code == 422
    assert over.status_code == 413 and "over the limit" in over.json()["detail"]
    assert unauthenticated.status_code == 413  # refused before anything else looks at it


# --------------------------------------------------------------------------- keys in logs


def test_api_keys_never_reach_the_logs(tmp_path, redis_url, caplog, capfd):
    """Requests with the key, a wrong key and none, on every route and outcome (2xx, 401,
    403, 404, 409, 413, 422, relayed scoring), with every logger at DEBUG and uvicorn's
    access log on: neither key string appears in any record or on stdout/stderr."""
    caplog.set_level(logging.DEBUG)
    scorer_port, api_port = free_port(), free_port()
    scorer_settings = make_settings(tmp_path / "scorer", redis_url)
    api_settings = make_settings(
        tmp_path / "api", redis_url, scorer_url=f"http://127.0.0.1:{scorer_port}"
    )
    score = {"model": "hand-0001/0", "documents": [{"id": "a", "text": "x"}]}
    with (
        serving(scorer_app.create_app(scorer_settings), scorer_port, access_log=True),
        serving(api_app.create_app(api_settings), api_port, access_log=True) as url,
        httpx.Client(base_url=url, timeout=10) as c,
    ):
        for headers in (AUTH, {"Authorization": f"Bearer {WRONG}"}, {}):
            c.get("/v1/runs", headers=headers)
            c.get("/v1/runs/nope", headers=headers)
            c.get("/v1/models", headers=headers)
            c.post("/v1/runs", json={"name": "x"}, headers=headers)
            c.post("/v1/runs/nope/cancel", headers=headers)
            c.post("/v1/runs/nope/resume", headers=headers)
            c.post("/v1/score", json=score, headers=headers)
            c.post("/v1/score", content=b"x" * (LIMIT + 1), headers=headers)
            httpx.get(f"http://127.0.0.1:{scorer_port}/v1/models", headers=headers)
    logged = caplog.text + "".join(capfd.readouterr())
    # the capture works: the access log of the relayed score request is in it
    assert '"POST /v1/score HTTP/1.1" 404' in logged and '"POST /v1/score HTTP/1.1" 403' in logged
    assert KEY not in logged and WRONG not in logged


# --------------------------------------------------------------------------- CORS


@pytest.mark.parametrize("kind", sorted(APPS))
def test_cors_is_off_unless_origins_are_configured(kind, tmp_path, redis_url):
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with TestClient(APPS[kind](make_settings(tmp_path, redis_url))) as c:
        r = c.options("/v1/score", headers=preflight)
        assert r.status_code == 405
        assert not any(h.startswith("access-control-") for h in r.headers)
        r = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("kind", sorted(APPS))
def test_cors_allows_only_the_configured_origins(kind, tmp_path, redis_url):
    settings = make_settings(
        tmp_path, redis_url, cors_origins=" https://ui.example , http://localhost:5173/"
    )
    assert settings.cors_origin_list == ["https://ui.example", "http://localhost:5173"]
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with TestClient(APPS[kind](settings)) as c:
        ok = c.options("/v1/score", headers={"Origin": "https://ui.example", **ask})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://ui.example"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        refused = c.options("/v1/score", headers={"Origin": "https://evil.example", **ask})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        # a real response to an allowed origin carries the headers, the model version exposed
        r = c.post(
            "/v1/score",
            json={"model": "x/0", "documents": []},
            headers={"Origin": "http://localhost:5173", **AUTH},
        )
        assert r.status_code == 422
        assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "x-model-version" in r.headers["access-control-expose-headers"].lower()


def test_cors_origins_must_be_urls():
    with pytest.raises(ValidationError, match="must start with http:// or https://"):
        Settings(cors_origins="https://ok.example,evil.example")


# --------------------------------------------------------------------------- binding


def test_services_bind_to_loopback_by_default(monkeypatch, tmp_path):
    for var in ("MATES_API_HOST", "MATES_SCORER_HOST", "MATES_CORS_ORIGINS"):
        monkeypatch.delenv(var, raising=False)
    defaults = Settings(
        api_key=KEY,
        database_url=f"sqlite:///{tmp_path}/runs.db",
        artifacts_dir=tmp_path / "artifacts",
    )
    assert defaults.api_host == defaults.scorer_host == "127.0.0.1"
    assert defaults.cors_origin_list == []
    served = []
    monkeypatch.setattr(api_app.uvicorn, "run", lambda app, **kw: served.append(kw))
    monkeypatch.setattr(scorer_app.uvicorn, "run", lambda app, **kw: served.append(kw))
    api_app.serve(defaults)
    scorer_app.serve(defaults)
    assert served == [{"host": "127.0.0.1", "port": 8000}, {"host": "127.0.0.1", "port": 8001}]
