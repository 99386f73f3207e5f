"""Task-side bookkeeping that needs no broker: failure records and stale generations."""

from __future__ import annotations

import pytest

pytest.importorskip("celery")

from mates.artifacts import RunPaths, read_json  # noqa: E402
from mates.errors import RunStateError  # noqa: E402
from mates.run import init_run  # noqa: E402
from services.common.store import Store  # noqa: E402
from services.worker.tasks import open_run, record_failure  # noqa: E402


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
