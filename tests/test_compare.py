"""MATES against random selection: the tokens-to-match metric and the two-arm comparison."""

from __future__ import annotations

import json

import pytest
from helpers import read_jsonl, write_jsonl

from mates.artifacts import RunPaths, read_json
from mates.compare import compare, heldout_curve, summarize, tokens_to_reach
from mates.errors import ConfigError, StageFailed
from mates.run import Run

CURVE = [(0, 10.0), (100, 8.0), (200, 6.0)]


@pytest.mark.parametrize(("target", "tokens"), [
    (7.0, 150.0),  # halfway between 100 (8.0) and 200 (6.0)
    (9.0, 50.0),
    (8.0, 100.0),  # reached exactly at a point
    (6.0, 200.0),
    (10.0, 0.0),  # the first point already reaches it
    (11.0, 0.0),
    (5.9, None),  # never reached
])
def test_tokens_to_reach_interpolates_linearly(target, tokens):
    assert tokens_to_reach(CURVE, target) == (None if tokens is None else pytest.approx(tokens))


def test_tokens_to_reach_takes_the_first_crossing():
    curve = [(0, 10.0), (100, 6.0), (200, 9.0), (300, 5.0)]
    assert tokens_to_reach(curve, 7.0) == pytest.approx(75.0)
    assert tokens_to_reach([], 1.0) is None


def _fake_run(root, run_id, curve, timings):
    root.mkdir(parents=True)
    write_jsonl(root / "metrics.jsonl",
                [{"stage": 0, "step": i, "tokens": t, "heldout_loss": v} for i, (t, v) in enumerate(curve)])
    (root / "run.json").write_text(json.dumps({
        "run_id": run_id, "status": "done",
        "stages": [{"timings": t} for t in timings]}), encoding="utf-8")
    return root


def test_summarize_reports_tokens_to_match_ratio(tmp_path):
    mates = _fake_run(tmp_path / "m", "m-1", [(0, 10.0), (100, 7.0), (200, 5.0)],
                      [{"training": 1.0, "probing": 2.0}, {"training": 1.5}])
    random = _fake_run(tmp_path / "r", "r-1", CURVE, [{"training": 1.0}, {"training": 1.0}])
    s = summarize(mates, random)
    assert s["target_heldout_loss"] == 6.0
    assert s["mates_tokens_to_match"] == pytest.approx(150.0)
    assert s["tokens_to_match_ratio"] == 0.75
    assert s["final_loss_delta"] == -1.0
    assert s["mates"]["seconds_by_state"] == {"training": 2.5, "probing": 2.0}
    assert s["mates"]["final_heldout_loss"] == 5.0 and s["random"]["final_tokens"] == 200
    assert s["mates"]["curve"][1] == {"tokens": 100, "heldout_loss": 7.0}


def test_summarize_when_mates_never_matches(tmp_path):
    mates = _fake_run(tmp_path / "m", "m-1", [(0, 10.0), (200, 7.0)], [{}])
    random = _fake_run(tmp_path / "r", "r-1", CURVE, [{}])
    s = summarize(mates, random)
    assert s["mates_tokens_to_match"] is None and s["tokens_to_match_ratio"] is None


# --------------------------------------------------------------------------- the tiny comparison


@pytest.fixture(scope="module")
def comparison(tiny_run):
    out = tiny_run["dir"].parent  # the MATES arm is the session's tiny run, already done
    summary = compare(tiny_run["cfg"], out, progress=False)
    return {"out": out, "summary": summary, "mates": out / "mates", "random": out / "random"}


@pytest.mark.slow
def test_compare_writes_json_and_png(comparison):
    out, summary = comparison["out"], comparison["summary"]
    on_disk = read_json(out / "comparison.json")
    assert on_disk == json.loads(json.dumps(summary))
    assert {"tokens_to_match_ratio", "mates", "random", "target_heldout_loss"} <= set(on_disk)
    for arm in ("mates", "random"):
        a = on_disk[arm]
        assert a["status"] == "done"
        assert a["curve"] == [{"tokens": t, "heldout_loss": v}
                              for t, v in heldout_curve(comparison[arm])]
        assert a["final_heldout_loss"] == a["curve"][-1]["heldout_loss"]
    assert on_disk["mates"]["final_tokens"] == on_disk["random"]["final_tokens"]  # same budget
    reach = tokens_to_reach(heldout_curve(comparison["mates"]), on_disk["target_heldout_loss"])
    if reach is None:
        assert on_disk["tokens_to_match_ratio"] is None
    else:
        assert on_disk["tokens_to_match_ratio"] == round(reach / on_disk["random"]["final_tokens"], 4)
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Baseline arm" in report and report.count('id="chart-loss"') == 2  # both arms


@pytest.mark.slow
def test_random_arm_shares_stage_0(comparison):
    m, r = RunPaths(comparison["mates"]), RunPaths(comparison["random"])
    stage0 = [row for row in read_jsonl(m.metrics) if row["stage"] == 0]
    assert stage0 and [row for row in read_jsonl(r.metrics) if row["stage"] == 0] == stage0
    assert read_json(r.selection(0)) == read_json(m.selection(0))
    assert (r.checkpoint(0) / "model.safetensors").read_bytes() == \
        (m.checkpoint(0) / "model.safetensors").read_bytes()
    shared = read_json(r.manifest)["stages"][0]["metrics"]
    assert shared["shared_from"] == str(comparison["mates"])
    assert shared["heldout_loss"] == read_json(m.manifest)["stages"][0]["metrics"]["heldout_loss"]


@pytest.mark.slow
def test_random_arm_selects_at_random_afterwards(comparison):
    r = RunPaths(comparison["random"])
    manifest = read_json(r.manifest)
    assert manifest["config"]["selection"]["method"] == "random"
    assert manifest["name"] != read_json(RunPaths(comparison["mates"]).manifest)["name"]
    for k in range(1, len(manifest["stages"])):
        sel = read_json(r.selection(k))
        assert sel["method"] == "random" and sel["model_version"] is None
        assert not r.probes(k - 1).exists() and not r.scores(k - 1).exists()


@pytest.mark.slow
def test_compare_again_reuses_both_arms(comparison, tiny_run, monkeypatch):
    def must_not_run(self, *a, **kw):
        raise AssertionError("a finished arm was executed again")

    monkeypatch.setattr(Run, "execute", must_not_run)
    assert compare(tiny_run["cfg"], comparison["out"], progress=False) == comparison["summary"]


def test_compare_needs_a_model_based_method(tiny_config_factory, tmp_path):
    with pytest.raises(ConfigError, match="`selection.method`"):
        compare(tiny_config_factory("selection.method=random"), tmp_path)


@pytest.mark.slow
def test_stage_0_is_not_shared_across_different_settings(tiny_run, tiny_config_factory, tmp_path):
    other = tiny_config_factory("train.lr=0.001", "selection.method=random")
    with pytest.raises(StageFailed, match="cannot share stage 0"):
        Run(other, tmp_path / "other", progress=False).execute(seed_stage0_from=tiny_run["dir"])
