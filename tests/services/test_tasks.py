"""Task-side bookkeeping that needs no broker: failure records, stale generations, poison
messages and the broker watch (against a stand-in for the Redis client)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("celery")

from mates.artifacts import RunPaths, read_json  # noqa: E402
from mates.errors import RunStateError  # noqa: E402
from mates.run import init_run  # noqa: E402
from services.common import lifecycle, stagetask, watchdog  # noqa: E402
from services.common.ending import record_failure  # noqa: E402
from services.common.stagetask import open_run  # noqa: E402
from services.common.store import Store  # noqa: E402
from services.worker import tasks  # noqa: E402


@pytest.fixture
def stored_run(tmp_path, tiny_config_factory):
    def make(*overrides: str):
        store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
        manifest = init_run(tiny_config_factory(*overrides), tmp_path / "artifacts")
        store.create_run(manifest.data, str(manifest.path.parent))
        return store, manifest.run_id, RunPaths(manifest.path.parent)

    return make


def test_a_run_that_cannot_be_opened_is_still_recorded_failed(stored_run):
    """A worker without a GPU cannot open a `device: cuda` run; the run must not hang."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: a cuda run opens fine here")
    store, run_id, paths = stored_run("device=cuda")
    gen = store.bump_generation(run_id)
    with pytest.raises(Exception, match="no CUDA device"):
        open_run(store, run_id, gen)
    record_failure(store, run_id, 1, gen, "mates.fit_influence_model: ConfigError: no CUDA device")
    row = store.get_run(run_id)
    assert row["status"] == "failed" and "no CUDA device" in row["error"]
    assert row["stages"][1]["state"] == "failed"
    assert read_json(paths.manifest)["status"] == "failed"


def test_a_stale_generation_records_nothing(stored_run):
    store, run_id, paths = stored_run()
    gen = store.bump_generation(run_id)
    run = open_run(store, run_id, gen)
    store.bump_generation(run_id)  # the run was resumed while this task still held it
    before = paths.manifest.read_bytes()
    with pytest.raises(RunStateError, match="was resumed since"):
        run.mark_failed(0, "late failure of an old task")
    assert paths.manifest.read_bytes() == before
    record_failure(store, run_id, 0, gen, "late failure of an old task")
    assert store.get_run(run_id)["status"] == "pending"
    assert paths.manifest.read_bytes() == before


def test_a_task_delivered_too_often_fails_its_run(stored_run, monkeypatch):
    store, run_id, paths = stored_run()
    gen = store.bump_generation(run_id)
    monkeypatch.setattr(stagetask, "default_store", lambda: store)
    limit = stagetask.get_settings().task_max_deliveries
    fit = tasks.fit_influence_model
    assert [fit.poisoned(run_id, 0, gen) for _ in range(limit)] == [False] * limit
    assert store.get_run(run_id)["status"] == "pending"
    assert fit.poisoned(run_id, 0, gen)
    row = store.get_run(run_id)
    assert row["status"] == "failed"
    assert f"delivered {limit + 1} times" in row["error"] and "fit_influence_model" in row["error"]
    assert row["stages"][0]["state"] == "failed"
    assert not tasks.score_shard.poisoned(run_id, 0, 4, gen)  # counted per task and shard


class FakeRedis:
    """The commands the broker watch uses, on a dict; `restart()` empties it as a Redis
    without persistence comes back."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.started_at = time.time() - 100.0

    def get(self, key):
        return self.data.get(key)

    def set(self, key, value, nx=False):
        if nx and key in self.data:
            return None
        self.data[key] = value.encode()
        return True

    def restart(self) -> None:
        self.data.clear()
        self.started_at = time.time()

    def time(self):
        now = time.time()
        return int(now), int((now % 1) * 1e6)

    def info(self, section):
        assert section == "server"  # as Redis counts it: whole seconds, from a floored start
        return {"uptime_in_seconds": int(time.time()) - int(self.started_at)}


def test_the_broker_watch_fails_runs_stranded_by_an_emptied_broker(stored_run):
    store, run_id, paths = stored_run()
    gen = store.bump_generation(run_id)
    store.claim_dispatch(run_id, gen, "train_stage", 0)
    store.mark_sent(run_id, gen, "train_stage", 0)
    store.set_status(run_id, "running")
    broker = FakeRedis()
    assert not watchdog.broker_lost(broker, store)  # first deployment: nothing was lost
    assert not watchdog.broker_lost(broker, store)  # the marker is there
    broker.data.clear()  # Redis restarted without persistence
    assert watchdog.broker_lost(broker, store)
    assert not watchdog.broker_lost(broker, store)  # claimed once per loss
    assert watchdog.fail_stranded_runs(store, since=9e12) == [run_id]
    row = store.get_run(run_id)
    assert row["status"] == "failed" and "lost its queued tasks" in row["error"]
    assert row["generation"] == gen + 1  # a task still running for it goes stale
    assert read_json(paths.manifest)["status"] == "failed"


def test_the_broker_watch_spares_runs_published_since(stored_run):
    store, run_id, _ = stored_run()
    gen = store.bump_generation(run_id)
    store.set_status(run_id, "queued")
    store.claim_dispatch(run_id, gen, "train_stage", 0)
    store.mark_sent(run_id, gen, "train_stage", 0)
    assert watchdog.fail_stranded_runs(store, since=0.0) == []
    assert store.get_run(run_id)["status"] == "queued"


def test_a_run_resumed_into_the_new_broker_is_spared_by_a_late_check(stored_run):
    """The cut-off is when the emptied broker came up, not when a check noticed it: a run
    stranded by the restart fails, one resumed into the new broker before any check noticed
    the loss does not (issue: a resumed run failed again by a late watch tick)."""
    store, run_id, _ = stored_run()
    broker = FakeRedis()
    assert watchdog.check_broker(broker, store) == []  # first deployment
    gen = store.bump_generation(run_id)
    store.claim_dispatch(run_id, gen, "train_stage", 0)
    store.mark_sent(run_id, gen, "train_stage", 0)
    store.set_status(run_id, "running")
    time.sleep(1.1)  # the broker's uptime counts whole seconds
    broker.restart()  # without persistence
    assert watchdog.check_broker(broker, store) == [run_id]  # published before the restart
    assert store.get_run(run_id)["status"] == "failed"

    time.sleep(1.1)
    broker.restart()  # again; this time the run is resumed before any check notices
    time.sleep(2.1)  # the cut-off is up to two seconds after the start (whole-second uptime)
    gen = store.bump_generation(run_id)
    store.set_status(run_id, "queued")
    store.claim_dispatch(run_id, gen, "train_stage", 0)
    time.sleep(0.5)
    assert watchdog.check_broker(broker, store) == []  # the late check: claimed after the start
    assert store.get_run(run_id)["status"] == "queued"
    store.mark_sent(run_id, gen, "train_stage", 0)
    assert watchdog.check_broker(broker, store) == []
    assert store.get_run(run_id)["status"] == "queued"


def test_a_task_published_just_before_the_restart_counts_as_lost(stored_run):
    """Redis's uptime is whole seconds from a floored start, so `TIME` less it can fall up
    to a second before the true start; the cut-off allows for that. A run whose task went
    into the old broker a moment before it died is failed, never left waiting (seen in
    tests/services/test_faults.py: Redis killed and restarted within a second of the
    stage's last publish)."""
    store, run_id, _ = stored_run()
    broker = FakeRedis()
    assert watchdog.check_broker(broker, store) == []
    gen = store.bump_generation(run_id)
    store.set_status(run_id, "running")
    while not 0.5 < time.time() % 1 < 0.6:  # late in a second
        time.sleep(0.01)
    store.claim_dispatch(run_id, gen, "score_shard", 0)
    store.mark_sent(run_id, gen, "score_shard", 0)
    time.sleep(0.2)
    broker.restart()  # without persistence, 0.2 s after the publish, in the same second
    time.sleep(1.0 - time.time() % 1 + 0.1)  # checked early in the next second: uptime 1
    assert broker.info("server")["uptime_in_seconds"] == 1  # though less has passed
    assert watchdog.broker_started_at(broker) >= broker.started_at
    assert watchdog.check_broker(broker, store) == [run_id]


def test_a_run_resumed_while_the_watch_lists_it_is_not_ended(stored_run, monkeypatch):
    """The watch lists the active runs, then ends them one by one; a run resumed between
    the two (a new generation, its task not yet claimed) is left to its new generation."""
    store, run_id, _ = stored_run()
    gen = store.bump_generation(run_id)
    store.claim_dispatch(run_id, gen, "train_stage", 0)
    store.mark_sent(run_id, gen, "train_stage", 0)
    store.set_status(run_id, "running")
    listed = {status: store.list_runs(status=status) for status in watchdog.WAITING_ON_BROKER}
    monkeypatch.setattr(store, "list_runs", lambda status, limit: listed[status])
    store.set_status(run_id, "failed", "a shard could not store its result")
    store.bump_generation(run_id)  # resumed; its train_stage not yet claimed
    store.set_status(run_id, "queued")
    assert watchdog.fail_stranded_runs(store, since=9e12) == []
    row = store.get_run(run_id)
    assert row["status"] == "queued" and row["generation"] == gen + 1


def test_a_run_created_before_its_first_claim_is_spared(stored_run):
    store, run_id, _ = stored_run()
    store.bump_generation(run_id)
    store.set_status(run_id, "queued")  # its enqueue has not claimed yet
    assert watchdog.fail_stranded_runs(store, since=9e12) == []
    assert store.get_run(run_id)["status"] == "queued"


# --------------------------------------------------------------------------- heartbeats


def test_the_heartbeat_beats_while_the_task_runs_and_survives_store_errors(stored_run, monkeypatch):
    import time

    from services.common.watchdog import Heartbeat

    store, run_id, _ = stored_run()
    beats = []
    real = store.beat

    def flaky(task_id, **row):
        beats.append(time.monotonic())
        if len(beats) == 2:
            raise OSError("the store blinked")
        real(task_id, **row)

    monkeypatch.setattr(store, "beat", flaky)
    with Heartbeat(store, 0.05, "task-1", run_id, 1, "mates.train_stage", 0):
        assert store.list_heartbeats(run_id)[0]["task_id"] == "task-1"  # from the start
        time.sleep(0.4)
        first = store.list_heartbeats(run_id)[0]
    assert len(beats) >= 4 and first["beat_at"] > first["started_at"]  # kept beating
    assert store.list_heartbeats(run_id) == []  # the task ended: its row went with it
    n = len(beats)
    time.sleep(0.15)
    assert len(beats) == n  # and the thread stopped


def _silent_run(stored_run, status: str):
    store, run_id, paths = stored_run()
    gen = store.bump_generation(run_id)
    run = open_run(store, run_id, gen)
    run.manifest.set_status("running")
    run.manifest.transition(0, "training")
    store.set_status(run_id, status)
    store.beat("task-1", run_id, gen, "mates.train_stage", 0, worker="trainer:42")
    settings = stagetask.get_settings().model_copy(update={"heartbeat_timeout_s": 0.0})
    return store, run_id, paths, gen, settings


def test_the_watch_fails_a_run_whose_process_stopped_beating(stored_run):
    from services.common.watchdog import end_silent_runs

    store, run_id, paths, gen, settings = _silent_run(stored_run, "running")
    patient = settings.model_copy(update={"heartbeat_timeout_s": 3600.0})
    assert end_silent_runs(store, patient) == []  # not silent for long enough yet
    assert end_silent_runs(store, settings) == [run_id]
    row = store.get_run(run_id)
    assert row["status"] == "failed" and row["generation"] == gen + 1
    assert row["error"].startswith(
        "stage 0 failed: training stopped: no heartbeat from its process (trainer:42) for "
    )
    assert "the trainer was killed or lost?" in row["error"]
    assert "resume to continue from the last checkpoint" in row["error"]
    assert row["stages"][0]["state"] == "failed"
    assert read_json(paths.manifest)["status"] == "failed"
    assert store.list_heartbeats(run_id) == []
    assert end_silent_runs(store, settings) == []  # once


def test_a_cancelling_run_whose_process_died_ends_cancelled(stored_run):
    from services.common.watchdog import end_silent_runs

    store, run_id, paths, gen, settings = _silent_run(stored_run, "cancelling")
    assert end_silent_runs(store, settings) == [run_id]
    row = store.get_run(run_id)
    assert row["status"] == "cancelled" and row["error"].startswith("cancelled; training stopped")
    assert row["stages"][0]["state"] == "cancelled"


def test_cancel_of_a_dead_run_cancels_it_at_once(stored_run):
    store, run_id, _, gen, settings = _silent_run(stored_run, "running")
    assert lifecycle.cancel_run(store, settings, run_id)["status"] == "cancelled"
    assert store.get_generation(run_id) == gen + 1


def test_resume_of_a_dead_run_fails_it_then_resumes_it(stored_run, monkeypatch):
    store, run_id, _, gen, settings = _silent_run(stored_run, "running")
    sent = []
    monkeypatch.setattr(lifecycle, "enqueue", lambda _s, _st, *args: sent.append(args))
    row = lifecycle.resume_run(store, settings, run_id)
    assert row["status"] == "queued" and row["generation"] == gen + 2
    assert sent == [(run_id, "train_stage", 0, gen + 2)]
    failed = store.get_run(run_id)["stages"][0]["transitions"][-1]
    assert failed["state"] == "failed" and "no heartbeat" in failed["reason"]


def test_resume_of_a_live_running_run_is_still_refused(stored_run):
    store, run_id, _, gen, settings = _silent_run(stored_run, "running")
    patient = settings.model_copy(update={"heartbeat_timeout_s": 3600.0})
    with pytest.raises(RunStateError, match="only a failed or cancelled run can be resumed"):
        lifecycle.resume_run(store, patient, run_id)
    assert store.get_run(run_id)["status"] == "running"


class _ChannelWithoutClient:
    """What a Redis channel looks like to its QoS once the broker died under it."""

    def conn_or_acquire(self, client=None):
        raise AttributeError("'NoneType' object has no attribute 'hostname'")


def test_putting_tasks_back_on_a_dead_connection_does_not_kill_the_consumer(caplog):
    """The kombu failure that left a worker consuming nothing after a Redis kill: restoring
    held tasks on close raises inside kombu. Ours logs it and leaves them to the broker's
    visibility-timeout sweep (they are in its unacked hash), so the close completes."""
    import kombu.transport.redis as kombu_redis

    from services.common.queue import ClosingSafeQoS

    assert kombu_redis.Channel.QoS is ClosingSafeQoS  # installed for every Redis channel
    qos = ClosingSafeQoS.__new__(ClosingSafeQoS)
    qos.channel, qos._delivered = _ChannelWithoutClient(), {"tag-1": object(), "tag-2": object()}
    with caplog.at_level("WARNING"):
        assert qos.restore_unacked() is None
    assert not qos._delivered
    assert "could not put 2 unacknowledged task(s) back" in caplog.text


def test_acknowledging_on_a_dead_connection_does_not_kill_the_consumer(caplog):
    """A task that finishes after the broker connection closed (late acknowledgement) cannot
    be acknowledged; ours forgets it locally and leaves it to the broker's redelivery."""
    from services.common.queue import ClosingSafeQoS

    qos = ClosingSafeQoS.__new__(ClosingSafeQoS)
    qos.channel, qos._delivered, qos._dirty = _ChannelWithoutClient(), {"t": object()}, set()
    qos._quick_ack = qos._dirty.add  # what QoS.__init__ sets up
    with caplog.at_level("WARNING"):
        assert qos.ack("t") is None
        assert qos.reject("t", requeue=False) is None
    assert qos._dirty == {"t"}  # dropped from this process's state at the next flush
    assert caplog.text.count("on a closed broker connection") == 2


# --------------------------------------------------------------------------- lost messages


def test_a_run_whose_message_was_lost_has_it_published_again_once(stored_run, monkeypatch):
    """kombu's Redis transport takes a task from its queue, then records it as unacknowledged;
    a worker or Redis killed between the two loses the message (seen in
    tests/services/test_faults.py: one of twenty shards never delivered, the stage's chord
    never complete). With nothing running and nothing delivered for `stall_s` after the last
    publish, the watch publishes it again, once: a chord's shards as their select, which
    scores whatever shard is missing."""
    store, run_id, _ = stored_run()
    gen = store.bump_generation(run_id)
    store.set_status(run_id, "running")
    store.claim_dispatch(run_id, gen, "score_shard", 0)
    store.mark_sent(run_id, gen, "score_shard", 0)
    store.count_delivery(run_id, gen, "mates.score_shard", 0, 1, 0)  # 19 of 20 shards ran
    sent = []

    def publish(app_settings, store_, run, task, stage, generation, *args, claim_as=None):
        sent.append((run, task, stage, generation, claim_as))
        return store_.claim_dispatch(run, generation, claim_as or task, stage)

    monkeypatch.setattr(lifecycle, "enqueue", publish)
    settings = stagetask.get_settings().model_copy(update={"stall_s": 3600.0})
    assert lifecycle.rescue_stalled_runs(settings, store) == []  # not stalled for long enough
    quick = settings.model_copy(update={"stall_s": 0.0})
    store.beat("task-9", run_id, gen, "mates.score_shard", 0, shard=2)
    assert lifecycle.rescue_stalled_runs(quick, store) == []  # something runs (or died: not ours)
    store.end_beat("task-9")
    time.sleep(0.01)
    assert lifecycle.rescue_stalled_runs(quick, store) == [run_id]
    assert sent == [(run_id, "select", 0, gen, "rescue:select")]
    store.mark_sent(run_id, gen, "rescue:select", 0)
    time.sleep(0.01)
    assert lifecycle.rescue_stalled_runs(quick, store) == []  # once per generation
    assert len(sent) == 1


def test_a_lost_single_task_is_published_as_itself(stored_run, monkeypatch):
    store, run_id, _ = stored_run()
    gen = store.bump_generation(run_id)
    store.set_status(run_id, "queued")
    store.claim_dispatch(run_id, gen, "train_stage", 0)  # created; the trainer never got it
    store.mark_sent(run_id, gen, "train_stage", 0)
    sent = []
    monkeypatch.setattr(
        lifecycle,
        "enqueue",
        lambda _s, _st, run, task, stage, g, claim_as=None: (
            sent.append((task, stage, g, claim_as)) or True
        ),
    )
    time.sleep(0.01)
    quick = stagetask.get_settings().model_copy(update={"stall_s": 0.0})
    assert lifecycle.rescue_stalled_runs(quick, store) == [run_id]
    assert sent == [("train_stage", 0, gen, "rescue:train_stage")]
    store.set_status(run_id, "failed", "ended meanwhile")
    assert lifecycle.rescue_stalled_runs(quick, store) == []  # only active runs
