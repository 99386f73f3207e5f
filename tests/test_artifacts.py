"""Artifact paths and atomic writes: a crash never leaves a half-written artifact that looks complete."""

from __future__ import annotations

import json

import pytest

from mates.artifacts import (
    RunPaths,
    atomic_path,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)
from mates.errors import ArtifactError


def test_run_paths_live_under_stage_dirs(tmp_path):
    p = RunPaths(tmp_path)
    assert p.manifest == tmp_path / "run.json"
    for k in (0, 3):
        stage = tmp_path / f"stage-{k}"
        assert p.stage(k) == stage
        for path in (p.selection(k), p.pool(k), p.checkpoint(k), p.probes(k),
                     p.influence_model(k), p.scores(k)):
            assert path.parent == stage
    with pytest.raises(ArtifactError, match=">= 0"):
        p.stage(-1)


def test_failed_write_leaves_the_old_file_and_no_temporaries(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    def rows():
        yield {"v": 2}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash"):
        write_jsonl(target, rows())
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_directory_artifacts_are_replaced_whole(tmp_path):
    target = tmp_path / "model"
    for version in (1, 2):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / f"v{version}.txt").write_text("x")
    assert [p.name for p in target.iterdir()] == ["v2.txt"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "v3.txt").write_text("x")
        raise RuntimeError("crash")
    assert [p.name for p in target.iterdir()] == ["v2.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_jsonl_round_trip_and_errors(tmp_path):
    rows = [{"id": "a", "score": 0.5}, {"id": "b", "score": -1.0}]
    assert write_jsonl(tmp_path / "s.jsonl", rows) == 2
    assert read_jsonl(tmp_path / "s.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"bad.jsonl:3: not valid JSON"):
        read_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(ArtifactError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl")


def test_read_json_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    write_json(tmp_path / "ok.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": [1, 2]}
