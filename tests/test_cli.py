"""The `mates` command line: output formats, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY_CONFIG, write_jsonl

from mates.artifacts import RunPaths
from mates.cli import main
from mates.influence import InfluenceScorer

IDS = [f"doc-{i:02d}" for i in range(50)]


@pytest.fixture
def scores_file(tmp_path):
    rows = [{"id": d, "score": (i * 37 % 50) / 10} for i, d in enumerate(IDS)]
    return write_jsonl(tmp_path / "scores.jsonl", rows), rows


def _lines(out: str) -> list:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("fraction", "count"), [(0.2, 10), (0.3, 15), (0.25, 12), (1.0, 50), (0.001, 1)]
)
def test_select_prints_json_ids_one_per_line(scores_file, capsys, fraction, count):
    path, _ = scores_file
    assert main(["select", "--scores", str(path), "--fraction", str(fraction)]) == 0
    ids = _lines(capsys.readouterr().out)
    assert len(ids) == count == max(1, round(fraction * len(IDS)))
    assert all(isinstance(i, str) for i in ids)
    assert len(set(ids)) == count and set(ids) <= set(IDS)


def test_select_is_seeded_and_topk_takes_the_lowest(scores_file, capsys):
    path, rows = scores_file
    args = ["select", "--scores", str(path), "--fraction", "0.2"]
    main(args + ["--seed", "3"])
    a = _lines(capsys.readouterr().out)
    main(args + ["--seed", "3"])
    assert _lines(capsys.readouterr().out) == a
    main(args + ["--seed", "4"])
    assert set(_lines(capsys.readouterr().out)) != set(a)
    main(args + ["--method", "topk"])
    lowest = [r["id"] for r in sorted(rows, key=lambda r: r["score"])[:10]]
    assert _lines(capsys.readouterr().out) == lowest


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.2"])
def test_select_rejects_fraction_outside_unit_interval(scores_file, capsys, fraction):
    path, _ = scores_file
    assert main(["select", "--scores", str(path), "--fraction", fraction]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--fraction must be in (0, 1]" in captured.err
    assert str(float(fraction)) in captured.err


def test_select_reports_bad_score_files(tmp_path, capsys):
    path = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "score": 1.0}, {"id": "a", "score": 2.0}])
    assert main(["select", "--scores", str(path), "--fraction", "0.5"]) == 2
    assert "duplicate score for id 'a'" in capsys.readouterr().err
    assert main(["select", "--scores", str(tmp_path / "nope.jsonl"), "--fraction", "0.5"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_select_exit_code_through_the_interpreter(scores_file):
    path, _ = scores_file
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mates.cli", "select", "--scores", str(path), "--fraction", "1.5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert "error: --fraction must be in (0, 1], got 1.5" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "mates.cli", "select", "--scores", str(path), "--fraction", "0.1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0 and len(_lines(done.stdout)) == 5


def test_run_dry_run_prints_resolved_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "run",
            str(TINY_CONFIG),
            "--dry-run",
            "--set",
            "selection.ratio=0.3",
            "--set",
            "seed=5",
            "--set",
            "train.betas=[0.8, 0.9]",
        ]
    )
    assert rc == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["selection"]["ratio"] == 0.3 and cfg["seed"] == 5
    assert cfg["train"]["betas"] == [0.8, 0.9]
    assert cfg["name"] == "tiny" and cfg["model"]["hidden_size"] == 32  # the rest from the file
    assert cfg["data"]["pool"] == str((tmp_path / "data/demo/pool.jsonl").resolve())
    assert list(tmp_path.iterdir()) == []  # nothing was run or written


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("selection.ratio=1.5", "`selection.ratio` must be in (0, 1], got 1.5"),
        ("selection.ratoi=0.1", "`selection.ratoi` is not a known setting"),
        ("model.num_heads=3", "model.num_heads"),
        ("selection.ratio", "must look like section.field=value"),
    ],
)
def test_run_with_bad_override_exits_2_naming_the_field(
    tmp_path, monkeypatch, capsys, override, needle
):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(TINY_CONFIG), "--dry-run", "--set", override]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.err.startswith("error: ")
    assert captured.out == ""


@pytest.mark.slow
def test_score_outputs_id_and_score_for_each_input(tiny_run, tmp_path, capsys):
    model_dir = RunPaths(tiny_run["dir"]).influence_model(0)
    docs = [
        {"id": f"q{i}", "text": t}
        for i, t in enumerate(
            [
                "the minister said the budget would rise",
                "thou art more lovely and more temperate",
                "click here to win a free prize now",
                "shares fell sharply after the report",
            ]
        )
    ]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    assert main(["score", "--model", str(model_dir), "--input", str(path)]) == 0
    rows = _lines(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [d["id"] for d in docs]
    assert all(set(r) == {"id", "score"} for r in rows)
    expected = InfluenceScorer.load(model_dir, torch.device("cpu")).score_texts(
        [d["text"] for d in docs]
    )
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)

    out = tmp_path / "scores.jsonl"
    assert (
        main(["score", "--model", str(model_dir), "--input", str(path), "--output", str(out)]) == 0
    )
    assert capsys.readouterr().out == ""
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


@pytest.mark.slow
def test_score_reports_bad_input_rows(tiny_run, tmp_path, capsys):
    model_dir = RunPaths(tiny_run["dir"]).influence_model(0)
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "ok"}, {"text": "no id"}])
    assert main(["score", "--model", str(model_dir), "--input", str(path)]) == 2
    assert f"{path}:2" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_of_a_finished_run_exits_2(tiny_run, capsys):
    assert main(["resume", str(tiny_run["dir"]), "--no-progress"]) == 2
    assert "already done" in capsys.readouterr().err


def test_missing_required_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["select", "--fraction", "0.2"])
    assert exc.value.code == 2
    assert "--scores" in capsys.readouterr().err


def test_resume_of_a_missing_run_dir_exits_2(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        (b"[1, 2]", "must be a JSON object"),
        (b'{"id": "\xff", "score": 2}', "not valid UTF-8"),
        (b'{"id": "b", "score": 2', "not valid JSON"),
        (b'{"id": 7, "score": 2}', "without a string `id`"),
        (b'{"id": "b", "score": "high"}', "is not a finite number: 'high'"),
        (b'{"id": "b", "score": NaN}', "is not a finite number: nan"),
        (b'{"id": "b"}', "is not a finite number: None"),
        (b'{"id": "a", "score": 3}', "duplicate score for id 'a' (first on line 1)"),
    ],
    ids=[
        "not-an-object",
        "non-utf8",
        "truncated-json",
        "int-id",
        "string-score",
        "nan-score",
        "no-score",
        "duplicate",
    ],
)
def test_select_reports_malformed_score_files_by_file_and_line(tmp_path, capsys, bad_line, needle):
    path = write_jsonl(
        tmp_path / "s.jsonl", [{"id": "a", "score": 1.0}, "", bad_line, {"id": "c", "score": 0.5}]
    )
    assert main(["select", "--scores", str(path), "--fraction", "0.5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {path}:3: ") and needle in captured.err, captured.err


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        (b'{"id": "b", "text": "caf\xe9"}', "not valid UTF-8"),
        (b'{"id": "b", "text": ', "not valid JSON"),
        (b'"just a string"', "row must be a JSON object"),
        (b'{"id": "b", "text": 5}', "non-string `text`"),
        (b'{"id": "a", "text": "again"}', "duplicate id 'a'"),
    ],
    ids=["non-utf8", "truncated-json", "not-an-object", "int-text", "duplicate"],
)
def test_score_reports_malformed_input_by_file_and_line(tmp_path, capsys, bad_line, needle):
    """The input is read (and refused) before the model is loaded: no model needed here."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "fine"}, bad_line])
    rc = main(["score", "--model", str(tmp_path / "no-model"), "--input", str(path)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.startswith(f"error: {path}:2: ") and needle in captured.err, captured.err


def test_score_and_select_name_a_missing_input_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["score", "--model", str(tmp_path), "--input", str(missing)]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
    assert main(["select", "--scores", str(missing), "--fraction", "0.5"]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err


def test_run_with_a_non_utf8_config_exits_2_naming_the_file(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"name: caf\xe9\n")
    assert main(["run", str(config), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and str(config) in captured.err
    assert captured.out == ""
