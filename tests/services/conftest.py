"""Fixtures for the service tests: a real Redis and a real PostgreSQL when one is at hand.

`redis_url` uses the Redis on 127.0.0.1:6379 if it answers, else starts a private
`redis-server` on a free port and stops it (by PID) at the end of the session.
`postgres_url` makes a fresh database on 127.0.0.1:5432 (trust auth) and drops it
afterwards; without a PostgreSQL there the tests that need it are skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from procs import free_port

REDIS_TEST_DB = 13
PG_HOST, PG_PORT = "127.0.0.1", 5432


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _wait_for(check, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s")
        time.sleep(0.05)


@pytest.fixture
def unused_port():
    """A function returning a loopback port nothing listens on (at the time of the call)."""
    return free_port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """`redis://host:port/13`, flushed at the start of the session."""
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_TEST_DB}"
    pidfile: Path | None = None
    if not _redis_answers(url):
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start one")
        port = free_port()
        pidfile = tmp_path_factory.mktemp("redis") / "redis.pid"
        subprocess.run(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--pidfile",
                str(pidfile),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/{REDIS_TEST_DB}"
        _wait_for(lambda: _redis_answers(url), "redis-server")
    redis.Redis.from_url(url).flushdb()
    yield url
    if pidfile is not None and pidfile.is_file():
        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)


def _pg_admin():
    """An autocommit connection to the `test` database, or None if PostgreSQL is not there."""
    import psycopg

    for user in ("postgres", "root"):
        try:
            return psycopg.connect(
                host=PG_HOST,
                port=PG_PORT,
                user=user,
                dbname="test",
                autocommit=True,
                connect_timeout=2,
            ), user
        except psycopg.OperationalError:
            continue
    return None, None


@pytest.fixture(scope="session")
def postgres_server():
    """(admin connection, user) for the PostgreSQL on 127.0.0.1:5432; skips without one."""
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex((PG_HOST, PG_PORT)) != 0:
            pytest.skip(f"PostgreSQL tests skipped: nothing listens on {PG_HOST}:{PG_PORT}")
    admin, user = _pg_admin()
    if admin is None:
        pytest.skip(
            f"PostgreSQL tests skipped: cannot log in to {PG_HOST}:{PG_PORT} "
            "as postgres or root (trust auth, database `test`)"
        )
    yield admin, user
    admin.close()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database `mates_test_<hex>`; dropped after the test."""
    admin, user = postgres_server
    name = f"mates_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
