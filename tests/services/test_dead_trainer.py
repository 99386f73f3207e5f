"""A trainer SIGKILLed mid-stage, for real: its run must not stay active for a day.

The stack of test_faults.py (a private redis-server, api, scorer, trainer and worker
processes stopped by PID) with a one-second heartbeat and a four-second heartbeat timeout,
and the broker's visibility timeout left at its day: nothing is redelivered, so only the
heartbeat watch can end the run. Stage 0 trains long enough (`stages.stage0_steps`) to be
killed after a mid-stage checkpoint (`train.checkpoint_every_steps`); the resumed run must
end with the selection of the same config run uninterrupted in one process.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("celery")
pytest.importorskip("fastapi")

from test_faults import (  # noqa: E402
    Stack,
    _until,
    assert_same_outcome,
    embedded_run,
    private_redis,
    running_stack,
)

from mates.artifacts import read_json  # noqa: E402

pytestmark = pytest.mark.slow

HEARTBEAT_S, HEARTBEAT_TIMEOUT_S, WATCH_S = 1, 4, 1
DEAD_RUN = (
    "name=deadtrainer",
    "stages.num_stages=2",
    "stages.stage0_steps=120",
    "train.checkpoint_every_steps=20",
    "influence.score_shard_docs=50",
)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    env = {
        "MATES_HEARTBEAT_S": str(HEARTBEAT_S),
        "MATES_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
        "MATES_BROKER_WATCH_S": str(WATCH_S),
        "MATES_VISIBILITY_TIMEOUT_S": "86400",
    }
    with running_stack(redis_server, tmp_path_factory.mktemp("dead"), env) as stack:
        yield stack


@pytest.fixture(scope="module")
def dead_cfg(tiny_config_factory):
    return tiny_config_factory(*DEAD_RUN)


@pytest.fixture(scope="module")
def uninterrupted(dead_cfg, tmp_path_factory):
    paths = embedded_run(dead_cfg, tmp_path_factory.mktemp("uninterrupted"))
    return {"selection": read_json(paths.selection(1))["ids"]}


def kill_trainer_after_a_checkpoint(stack: Stack, run_id: str) -> float:
    """SIGKILL the trainer's process group once stage 0 has a mid-stage checkpoint; the
    time of the kill."""
    trainer_json = stack.paths(run_id).checkpoint(0) / "trainer.json"

    def mid_stage() -> bool:
        try:
            ck = read_json(trainer_json)
        except Exception:  # not written yet, or being replaced
            return False
        return not ck["complete"] and ck["stage_step"] >= 20

    _until(mid_stage, 120, f"a mid-stage checkpoint of {run_id}\n{stack.logs()}", every=0.02)
    assert stack.store.list_heartbeats(run_id), "the training task does not beat"
    os.killpg(stack.procs["trainer"].pid, signal.SIGKILL)
    stack.procs["trainer"].popen.wait(10)
    assert stack.run(run_id)["status"] == "running"
    return time.monotonic()


def restart_trainer(stack: Stack) -> None:
    stack.start("trainer")
    stack.ready("trainer")


def test_a_killed_trainer_fails_its_run_and_one_resume_finishes_it(stack, dead_cfg, uninterrupted):
    run_id = stack.submit(dead_cfg)
    killed_at = kill_trainer_after_a_checkpoint(stack, run_id)
    run = stack.wait_run(run_id, timeout=HEARTBEAT_TIMEOUT_S + 3 * WATCH_S + 5)
    assert time.monotonic() - killed_at >= HEARTBEAT_TIMEOUT_S - HEARTBEAT_S
    assert run["status"] == "failed", run
    assert "training stopped: no heartbeat from its process" in run["error"], run["error"]
    assert "resume to continue from the last checkpoint" in run["error"]
    assert run["stages"][0]["state"] == "failed"
    assert run["generation"] == 2  # the killed task's message, if redelivered, is stale

    restart_trainer(stack)
    r = stack.client.post(f"/v1/runs/{run_id}/resume")
    assert r.status_code == 202, r.text
    stack.wait_run(run_id, until=("done", "failed", "cancelled"))
    assert_same_outcome(stack, run_id, uninterrupted)
    trained = [t["state"] for t in stack.run(run_id)["stages"][0]["transitions"]]
    assert trained[:4] == ["pending", "training", "failed", "training"]
    assert stack.store.list_heartbeats(run_id) == []  # every task that ended took its row


def test_cancel_of_a_run_whose_trainer_was_killed_ends_cancelled(stack, dead_cfg, uninterrupted):
    run_id = stack.submit(dead_cfg)
    kill_trainer_after_a_checkpoint(stack, run_id)
    r = stack.client.post(f"/v1/runs/{run_id}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelling", r.text
    run = stack.wait_run(run_id, timeout=HEARTBEAT_TIMEOUT_S + 3 * WATCH_S + 5)
    assert run["status"] == "cancelled", run
    assert "no heartbeat" in run["error"] and run["stages"][0]["state"] == "cancelled"

    restart_trainer(stack)
    assert stack.client.post(f"/v1/runs/{run_id}/resume").status_code == 202
    stack.wait_run(run_id, until=("done", "failed", "cancelled"))
    assert_same_outcome(stack, run_id, uninterrupted)
