"""`mates report`: a run's curves, timeline, influences and selections as one HTML file."""

from __future__ import annotations

import re
import shutil

import pytest

from mates.artifacts import RunPaths, read_json, write_json
from mates.cli import main
from mates.errors import ArtifactError
from mates.report import charts, render_report, run_view, write_report


def test_view_holds_every_stage_with_its_statistics(tiny_run):
    view = run_view(tiny_run["dir"])
    m, paths = tiny_run["manifest"], RunPaths(tiny_run["dir"])
    assert view["status"] == "done" and view["run_id"] == m["run_id"]
    assert [s["stage"] for s in view["stages"]] == list(range(len(m["stages"])))
    assert len(view["curve"]) == len(paths.metrics.read_text().splitlines())
    for st in view["stages"][:-1]:  # every stage but the last probes, fits, scores, selects
        met = m["stages"][st["stage"]]["metrics"]
        assert len(st["influences"]) == met["probes"]["count"]
        assert len(st["scores"]) == met["scores"]["count"]
        assert st["val_spearman"] == met["influence_model"]["val_spearman"]
        assert st["seconds"]["training"] == m["stages"][st["stage"]]["timings"]["training"]
        shares = st["domain_shift"]
        assert shares and abs(sum(d["pool"] for d in shares.values()) - 1) < 1e-9
        assert abs(sum(d["selected"] for d in shares.values()) - 1) < 1e-9
    assert view["stages"][0]["overlap_with_previous"] is None
    for k in range(1, len(view["stages"])):
        now = set(read_json(paths.selection(k))["ids"])
        before = set(read_json(paths.selection(k - 1))["ids"])
        assert view["stages"][k]["overlap_with_previous"] == len(now & before) / len(now)


def test_report_is_self_contained_with_every_chart(tiny_run, tmp_path):
    out = write_report(tiny_run["dir"], tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    n = len(tiny_run["manifest"]["stages"])
    ids = set(re.findall(r'id="chart-([a-z]+(?:-\d+)?)"', text))
    assert {"loss", "timeline"} <= ids
    assert {f"distribution-{k}" for k in range(n - 1)} <= ids
    assert {f"domains-{k}" for k in range(1, n)} <= ids  # model-based selections only
    assert text.count("<svg") >= 2 + 2 * (n - 1)
    assert "<path" in text  # the charts drew something
    # nothing fetched from elsewhere: no scripts, stylesheets or images by reference
    assert not re.search(r"<(script|link|img)\b[^>]*(src|href)=", text)
    assert not re.search(r"(src|href)=\"https?://", text)


def test_an_unfinished_run_is_reported_as_far_as_it_got(tiny_run, tmp_path):
    run_dir = tmp_path / "partial"
    shutil.copytree(tiny_run["dir"], run_dir)
    paths = RunPaths(run_dir)
    m = read_json(paths.manifest)
    m["status"], m["current_stage"] = "failed", 2
    m["error"] = "stage 2 failed: disk full <sic>"
    last = m["stages"][-1]
    last.update(state="failed", metrics={}, timings={"training": 1.5}, error="disk full")
    write_json(paths.manifest, m)
    paths.selection(2).unlink()
    view = run_view(run_dir)
    assert view["stages"][-1]["state"] == "failed"
    assert view["stages"][-1]["overlap_with_previous"] is None
    html = render_report(view)
    assert "disk full &lt;sic&gt;" in html  # escaped, not markup
    assert "state-failed" in html
    assert set(charts(view)) >= {"loss", "timeline"}


def test_cli_writes_the_report_and_names_a_missing_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(tiny_run["dir"]), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no run.json" in capsys.readouterr().err
    with pytest.raises(ArtifactError):
        run_view(tmp_path)
