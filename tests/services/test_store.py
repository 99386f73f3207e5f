"""The run store on SQLite and on PostgreSQL (skipped when none listens on 127.0.0.1:5432)."""

from __future__ import annotations

import threading

import pytest

from mates.errors import RunStateError
from mates.manifest import Manifest
from services.common.store import RunExists, Store, normalize_url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/nested/dir/runs.db"
    else:
        url = request.getfixturevalue("postgres_url")
    s = Store(url)
    yield s
    s.close()


@pytest.fixture
def manifest(tmp_path):
    """A real run.json, three stages, written by the library's Manifest."""
    return Manifest.create(
        tmp_path / "run" / "run.json", {"name": "t", "seed": 0}, "fp", 3, run_id="t-0001"
    )


def _add(store: Store, m: Manifest) -> None:
    store.create_run(m.data, str(m.path.parent))


def test_create_get_and_list(store, manifest):
    _add(store, manifest)
    run = store.get_run("t-0001")
    assert run["id"] == "t-0001" and run["name"] == "t" and run["status"] == "pending"
    assert run["num_stages"] == 3 and run["generation"] == 0
    assert run["config"] == {"name": "t", "seed": 0}
    assert run["artifacts_dir"] == str(manifest.path.parent)
    assert [s["stage"] for s in run["stages"]] == [0, 1, 2]
    assert run["stages"][0]["transitions"] == [
        {
            "state": "pending",
            "at": manifest.data["stages"][0]["transitions"][0]["at"],
            "reason": None,
        }
    ]
    assert store.get_run("nope") is None
    with pytest.raises(RunExists, match="already exists"):
        _add(store, manifest)

    later = Manifest.create(
        manifest.path.parent.parent / "b" / "run.json", {"name": "b"}, "fp", 1, run_id="b-0002"
    )
    later.data["created_at"] = manifest.data["created_at"] + 10
    _add(store, later)
    store.set_status("b-0002", "running")
    assert [r["id"] for r in store.list_runs()] == ["b-0002", "t-0001"]
    assert [r["id"] for r in store.list_runs(status="running")] == ["b-0002"]
    assert [r["id"] for r in store.list_runs(limit=1, offset=1)] == ["t-0001"]
    summary = store.list_runs(status="pending")[0]
    assert summary["stage_state"] == "pending" and "config" not in summary


def test_sync_inserts_new_transitions_and_is_idempotent(store, manifest):
    _add(store, manifest)
    manifest.on_save = store.sync_manifest
    manifest.set_status("running")
    manifest.transition(0, "training")
    manifest.add_timing(0, "train", 1.5)
    manifest.update_metrics(0, tokens=1024)
    manifest.transition(0, "selecting")
    for _ in range(3):
        store.sync_manifest(manifest.data)
    run = store.get_run("t-0001")
    assert run["status"] == "running" and run["current_stage"] == 0
    st = run["stages"][0]
    assert [t["state"] for t in st["transitions"]] == ["pending", "training", "selecting"]
    assert [t["at"] for t in st["transitions"]] == [
        t["at"] for t in manifest.data["stages"][0]["transitions"]
    ]
    assert st["state"] == "selecting" and st["timings"] == {"train": 1.5}
    assert st["metrics"] == {"tokens": 1024}
    assert [t["state"] for t in run["stages"][1]["transitions"]] == ["pending"]

    manifest.transition(0, "failed", error="boom")
    manifest.set_status("failed", "stage 0: boom")
    run = store.get_run("t-0001")
    assert run["status"] == "failed" and run["error"] == "stage 0: boom"
    assert run["stages"][0]["error"] == "boom"
    assert run["stages"][0]["transitions"][-1] == {
        "state": "failed",
        "at": manifest.data["stages"][0]["transitions"][-1]["at"],
        "reason": "boom",
    }


def test_non_finite_metrics_are_stored_as_null(store, manifest):
    _add(store, manifest)
    manifest.on_save = store.sync_manifest
    manifest.update_metrics(0, heldout_loss=float("nan"), curve=[1.0, float("inf")])
    assert store.get_run("t-0001")["stages"][0]["metrics"] == {
        "heldout_loss": None,
        "curve": [1.0, None],
    }
    assert store.register_model("t-0001", 0, "/m", {"val_spearman": float("nan")})
    assert store.list_models()[0]["val_spearman"] is None


def test_sync_of_an_unknown_run_raises(store, manifest):
    with pytest.raises(RunStateError, match="not in the run store"):
        store.sync_manifest(manifest.data)


def test_cancelling_is_kept_until_the_run_ends(store, manifest):
    _add(store, manifest)
    manifest.on_save = store.sync_manifest
    manifest.set_status("running")
    store.set_status("t-0001", "cancelling")
    manifest.transition(0, "training")  # a progress report from the worker
    assert store.get_run("t-0001")["status"] == "cancelling"
    manifest.set_status("cancelled", "cancelled by request")
    run = store.get_run("t-0001")
    assert run["status"] == "cancelled" and run["error"] == "cancelled by request"
    with pytest.raises(ValueError, match="unknown run status"):
        store.set_status("t-0001", "bogus")


def test_generation_bump(store, manifest):
    _add(store, manifest)
    assert store.get_generation("t-0001") == 0
    assert store.bump_generation("t-0001") == 1
    assert store.bump_generation("t-0001") == 2
    assert store.get_generation("t-0001") == 2
    with pytest.raises(RunStateError):
        store.bump_generation("nope")
    with pytest.raises(RunStateError):
        store.get_generation("nope")


def test_claim_dispatch_once(store, manifest):
    _add(store, manifest)
    assert store.claim_dispatch("t-0001", 1, "train_stage", 0) is True
    assert store.claim_dispatch("t-0001", 1, "train_stage", 0) is False
    # the store is still usable after the rolled-back insert, and other keys are distinct
    assert store.claim_dispatch("t-0001", 2, "train_stage", 0) is True
    assert store.claim_dispatch("t-0001", 1, "train_stage", 1) is True
    assert store.claim_dispatch("t-0001", 1, "fit_influence_model", 0) is True


def test_an_unconfirmed_claim_is_taken_over_once_stale(store, manifest):
    """A claimer that died between claiming and publishing does not strand the run."""
    _add(store, manifest)
    assert store.claim_dispatch("t-0001", 1, "select", 0) is True
    assert store.dispatch_sent("t-0001", 1, "select", 0) is False
    assert store.claim_dispatch("t-0001", 1, "select", 0) is False  # young: its owner may send
    assert store.claim_dispatch("t-0001", 1, "select", 0, stale_after=-1) is True  # taken over
    store.mark_sent("t-0001", 1, "select", 0)
    assert store.dispatch_sent("t-0001", 1, "select", 0) is True
    assert (
        store.claim_dispatch("t-0001", 1, "select", 0, stale_after=-1) is False
    )  # sent: never again


def test_set_status_if_is_conditional(store, manifest):
    _add(store, manifest)
    store.set_status("t-0001", "running")
    assert store.set_status_if("t-0001", "cancelling", ("queued", "running")) is True
    assert store.set_status_if("t-0001", "cancelling", ("queued", "running")) is False
    assert store.get_run("t-0001")["status"] == "cancelling"


def test_concurrent_claims_yield_exactly_one_winner(store, manifest):
    _add(store, manifest)
    n = 8
    barrier = threading.Barrier(n)
    results: list[bool] = []
    lock = threading.Lock()

    def claim() -> None:
        barrier.wait()
        got = store.claim_dispatch("t-0001", 3, "select", 1)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=claim) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [False] * (n - 1) + [True]


def test_register_model_once(store, manifest):
    _add(store, manifest)
    fit = {
        "val_spearman": 0.41,
        "val_pearson": 0.5,
        "train_spearman": 0.9,
        "best_epoch": 2,
        "epochs": 3,
        "train_size": 14,
        "val_size": 2,
        "target_mean": 0.0,
        "target_std": 1.0,
        "seconds": 1.0,
    }
    assert store.register_model("t-0001", 0, "/a/influence-model", fit) is True
    assert store.register_model("t-0001", 0, "/b/influence-model", {"val_spearman": 0.0}) is False
    models = store.list_models()
    assert len(models) == 1
    m = models[0]
    assert m["version"] == "t-0001/0" and m["run_id"] == "t-0001" and m["stage"] == 0
    assert m["path"] == "/a/influence-model" and m["val_spearman"] == 0.41
    assert m["val_pearson"] == 0.5 and m["num_probes"] == 16 and m["fit"] == fit
    store.register_model("t-0001", 1, "/c", {"val_spearman": None, "num_probes": 7})
    assert [m["version"] for m in store.list_models("t-0001")] == ["t-0001/1", "t-0001/0"]
    assert store.list_models("other") == []
    with pytest.raises(RunStateError):
        store.register_model("nope", 0, "/x", {})


def test_tables_are_created_idempotently(store, manifest):
    _add(store, manifest)
    again = Store(store.url)
    try:
        assert again.get_run("t-0001")["id"] == "t-0001"
        again.ping()
    finally:
        again.close()


def test_url_normalization():
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///runs/x.db").drivername == "sqlite"


def test_memory_sqlite_is_one_database():
    s = Store("sqlite://")
    s.ping()
    assert s.list_runs() == []
    s.close()


def test_deliveries_are_counted_per_attempt(store, manifest):
    _add(store, manifest)
    key = ("t-0001", 1, "mates.score_shard", 0, 3)
    assert [store.count_delivery(*key, attempt=0) for _ in range(3)] == [1, 2, 3]
    assert store.count_delivery(*key, attempt=1) == 1  # a retry is a new attempt
    assert store.count_delivery("t-0001", 2, "mates.score_shard", 0, 3, 0) == 1  # new generation
    rows = {(r["generation"], r["attempt"]): r["count"] for r in store.list_deliveries("t-0001")}
    assert rows == {(1, 0): 3, (1, 1): 1, (2, 0): 1}


def test_concurrent_deliveries_are_all_counted(store, manifest):
    _add(store, manifest)
    got: list[int] = []

    def deliver() -> None:
        got.append(store.count_delivery("t-0001", 1, "mates.fit_influence_model", 0, -1, 0))

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [1, 2, 3, 4, 5, 6]


def test_service_state_and_last_dispatch(store, manifest):
    _add(store, manifest)
    assert store.get_state("k") is None
    store.put_state("k", "a")
    store.put_state("k", "b")
    assert store.get_state("k") == "b"
    assert store.last_dispatch_at("t-0001", 1) is None
    store.claim_dispatch("t-0001", 1, "train_stage", 0)
    claimed = store.last_dispatch_at("t-0001", 1)
    assert claimed > 0  # claimed, whether or not sent yet
    store.mark_sent("t-0001", 1, "train_stage", 0)
    assert store.last_dispatch_at("t-0001", 1) == claimed
    assert store.last_dispatch_at("t-0001", 2) is None  # per generation


def test_generation_bump_from_is_conditional(store, manifest):
    _add(store, manifest)
    assert store.bump_generation_from("t-0001", 0) is True
    assert store.bump_generation_from("t-0001", 0) is False  # someone else moved it on
    assert store.get_generation("t-0001") == 1
    assert store.bump_generation_from("nope", 0) is False


def test_heartbeats_find_runs_whose_tasks_all_went_silent(store, manifest):
    _add(store, manifest)
    store.set_status("t-0001", "running")
    assert store.silent_runs(older_than=9e12) == []  # nothing started: queued is not dead
    store.beat("task-a", "t-0001", 0, "mates.score_shard", 1, shard=3, worker="h:1")
    store.beat("task-a", "t-0001", 0, "mates.score_shard", 1, shard=3, worker="h:1")  # refresh
    [row] = store.list_heartbeats("t-0001")
    assert row["beat_at"] >= row["started_at"] and (row["task"], row["shard"]) == (
        "mates.score_shard",
        3,
    )
    assert store.silent_runs(older_than=row["beat_at"]) == []  # beat since
    [silent] = store.silent_runs(older_than=row["beat_at"] + 1)
    assert silent == {
        "run_id": "t-0001",
        "status": "running",
        "generation": 0,
        "beat_at": row["beat_at"],
        "task": "mates.score_shard",
        "stage": 1,
        "shard": 3,
        "worker": "h:1",
    }
    assert store.silent_runs(older_than=9e12, run_id="other") == []
    assert [r["run_id"] for r in store.silent_runs(older_than=9e12, run_id="t-0001")] == ["t-0001"]

    store.set_status("t-0001", "cancelling")
    assert store.silent_runs(older_than=9e12)[0]["status"] == "cancelling"
    store.set_status("t-0001", "failed")  # ended: not active, so not silent
    assert store.silent_runs(older_than=9e12) == []
    store.set_status("t-0001", "running")
    store.bump_generation("t-0001")  # a task of an older generation is not the run's
    assert store.silent_runs(older_than=9e12) == []
    store.clear_heartbeats("t-0001", below_generation=1)
    assert store.list_heartbeats("t-0001") == []


def test_a_task_that_ends_stops_counting(store, manifest):
    _add(store, manifest)
    store.set_status("t-0001", "running")
    store.beat("task-a", "t-0001", 0, "mates.train_stage", 0)
    store.beat("task-b", "t-0001", 0, "mates.train_stage", 0)
    store.end_beat("task-a")
    store.end_beat("task-a")  # twice is fine
    assert [r["task_id"] for r in store.list_heartbeats("t-0001")] == ["task-b"]
    assert len(store.silent_runs(older_than=9e12)) == 1  # two tasks at one instant: one row
    store.end_beat("task-b")
    assert store.silent_runs(older_than=9e12) == []


# --------------------------------------------------------------------------- schema revisions


def test_a_new_store_is_migrated_to_exactly_the_schema(store):
    """The revisions build what `schema.py` declares, no more and no less: a change to the
    tables without its migration fails here (on SQLite and on PostgreSQL)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.common.store.schema import REVISION, metadata

    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() == REVISION
        assert compare_metadata(context, metadata) == []


def test_a_store_from_before_revisions_is_stamped_and_keeps_its_rows(tmp_path, manifest):
    """Stores created before session 10 hold the tables (made by `create_all`) and no
    revision: opening one records revision 0001 and loses nothing."""
    from sqlalchemy import inspect

    from services.common.store.engine import make_engine
    from services.common.store.schema import REVISION, metadata

    url = f"sqlite:///{tmp_path}/old.db"
    engine = make_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        assert "alembic_version" not in inspect(conn).get_table_names()
    engine.dispose()
    old = Store.__new__(Store)  # the old store's writes, without its migration
    old.url, old.engine = url, make_engine(url)
    _add(old, manifest)
    old.close()

    store = Store(url)
    assert store.get_run("t-0001")["name"] == "t"
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == REVISION
    store.close()


def test_stores_opened_at_once_all_end_migrated(tmp_path):
    """The api, the workers and the trainer open the store together on a fresh database:
    four processes, and four threads of one."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path}/together.db"
    code = f"from services.common.store import Store; Store({url!r}).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs if p.wait(timeout=120) != 0]
    assert errors == []

    url = f"sqlite:///{tmp_path}/threads.db"
    failed: list[BaseException] = []

    def open_one() -> None:
        try:
            Store(url).close()
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []
    for u in (f"sqlite:///{tmp_path}/together.db", url):
        assert Store(u).list_runs() == []
