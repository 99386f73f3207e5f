"""The stage state machine in run.json."""

from __future__ import annotations

import pytest

from mates.artifacts import read_json
from mates.errors import RunStateError
from mates.manifest import STAGE_STATES, Manifest


@pytest.fixture
def manifest(tmp_path):
    return Manifest.create(tmp_path / "run.json", {"name": "t"}, "fp", num_stages=2)


def test_created_pending_and_saved(manifest, tmp_path):
    on_disk = read_json(tmp_path / "run.json")
    assert on_disk["status"] == "pending" and on_disk["run_id"].startswith("t-")
    assert [s["state"] for s in on_disk["stages"]] == ["pending", "pending"]
    assert all(s["transitions"][0]["state"] == "pending" for s in on_disk["stages"])


def test_forward_transitions_are_recorded_with_timestamps(manifest, tmp_path):
    for state in STAGE_STATES[1:]:
        manifest.transition(0, state)
    st = read_json(tmp_path / "run.json")["stages"][0]
    assert [t["state"] for t in st["transitions"]] == list(STAGE_STATES)
    times = [t["at"] for t in st["transitions"]]
    assert times == sorted(times)


def test_repeating_a_state_records_nothing(manifest):
    manifest.transition(0, "training")
    manifest.transition(0, "training")
    assert [t["state"] for t in manifest.stage(0)["transitions"]] == ["pending", "training"]


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (["training", "probing"], "training"),  # backwards
        (["training", "done"], "failed"),  # a done stage cannot fail
        (["training", "done"], "cancelled"),
    ],
)
def test_illegal_transitions_are_refused(manifest, path, bad):
    for state in path:
        manifest.transition(0, state)
    with pytest.raises(RunStateError, match="illegal transition"):
        manifest.transition(0, bad)


def test_failed_and_cancelled_stages_can_resume(manifest):
    manifest.transition(0, "probing")
    manifest.transition(0, "failed", "boom")
    assert manifest.stage(0)["error"] == "boom"
    manifest.transition(0, "training")
    assert manifest.stage(0)["error"] is None
    manifest.transition(0, "cancelled", "by request")
    manifest.transition(0, "scoring")
    assert manifest.stage(0)["state"] == "scoring"


def test_timings_accumulate_and_metrics_merge(manifest, tmp_path):
    manifest.add_timing(1, "training", 1.25)
    manifest.add_timing(1, "training", 0.5)
    manifest.update_metrics(1, a=1)
    manifest.update_metrics(1, b=2)
    st = read_json(tmp_path / "run.json")["stages"][1]
    assert st["timings"] == {"training": 1.75}
    assert st["metrics"] == {"a": 1, "b": 2}
    manifest.set_status("failed", "stage 1 failed: x")
    assert Manifest.load(tmp_path / "run.json").data["error"] == "stage 1 failed: x"
