"""Artifact paths and atomic writes: a crash never leaves a half-written artifact that looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mates.artifacts import (
    RunPaths,
    append_jsonl,
    atomic_path,
    iter_jsonl,
    read_json,
    read_jsonl,
    remove_stale_temporaries,
    repair_log,
    write_json,
    write_jsonl,
)
from mates.errors import ArtifactError, DataError


def test_run_paths_live_under_stage_dirs(tmp_path):
    p = RunPaths(tmp_path)
    assert p.manifest == tmp_path / "run.json"
    for k in (0, 3):
        stage = tmp_path / f"stage-{k}"
        assert p.stage(k) == stage
        for path in (
            p.selection(k),
            p.pool(k),
            p.checkpoint(k),
            p.probes(k),
            p.influence_model(k),
            p.scores(k),
        ):
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


# --------------------------------------------------------------------------- crashes and full disks

# `python -c KILLED_WRITER DIR MOMENT` replaces DIR/model (a directory artifact holding
# v1.txt and v2.txt) with one holding new.txt, and SIGKILLs itself at MOMENT: "writing"
# (half of new.txt written) or "renaming" (the old folder moved aside, the new not yet in).
KILLED_WRITER = r"""
import os, signal, sys
from pathlib import Path
from mates.artifacts import atomic_path

root, moment = Path(sys.argv[1]), sys.argv[2]
final = root / "model"
real_replace = os.replace

def replace(src, dst):
    if moment == "renaming" and Path(dst) == final:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

os.replace = replace
with atomic_path(final) as tmp:
    tmp.mkdir()
    with open(tmp / "new.txt", "w") as fh:
        fh.write("x" * 1000)
        fh.flush()
        if moment == "writing":
            os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("moment", ["writing", "renaming"])
def test_a_writer_killed_midway_leaves_the_old_artifact_or_none(tmp_path, moment):
    final = tmp_path / "model"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        for name in ("v1.txt", "v2.txt"):
            (tmp / name).write_text(name)
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), moment])
    assert done.returncode == -signal.SIGKILL
    if final.exists():  # never a mix of the two, nor a partly deleted old one
        assert sorted(p.name for p in final.iterdir()) == ["v1.txt", "v2.txt"]
    assert moment == "writing" or not final.exists()
    assert remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == (["model"] if final.exists() else [])


# `python -c FULL_DISK DIR` writes three artifacts through three writers, and appends to
# a log, with the file size limited to 10 kB (writes past it fail with EFBIG); it prints
# each error's message.
FULL_DISK = r"""
import resource, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from mates.artifacts import append_jsonl, atomic_path, write_jsonl
from mates.errors import ArtifactError

root = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
big = {"w": torch.zeros(10_000)}
writers = {
    "rows.jsonl": lambda p: write_jsonl(p, ({"i": i} for i in range(10_000))),
    "state.pt": lambda p: torch.save(big, open(p, "wb")),
    "model.safetensors": lambda p: save_file(big, p),
}
for name, write in writers.items():
    try:
        if name == "rows.jsonl":
            write(root / name)
        else:
            with atomic_path(root / name) as tmp:
                write(tmp)
    except ArtifactError as e:
        print(e)
try:  # the log holds 9,990 bytes: the row is cut off at 10,000
    append_jsonl(root / "log.jsonl", {"row": "x" * 100})
except ArtifactError as e:
    print(e)
"""


def test_a_full_disk_is_reported_naming_the_artifact_and_the_reason(tmp_path):
    names = ("rows.jsonl", "state.pt", "model.safetensors")
    for name in names:
        (tmp_path / name).write_text("old")
    log = tmp_path / "log.jsonl"
    rows = [{"i": i, "pad": "x" * 80} for i in range(200)]
    text = "".join(json.dumps(r) + "\n" for r in rows)[:9990]  # the last line torn earlier
    log.write_text(text)
    whole = rows[: text.count("\n")]
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        *(f"could not write {tmp_path / name}: File too large" for name in names),
        f"could not append to {log}: File too large",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "log.jsonl"])
    assert all((tmp_path / name).read_text() == "old" for name in names)

    assert repair_log(log) and read_jsonl(log) == whole  # the torn append is cut off
    assert not repair_log(log)
    log.write_bytes(log.read_bytes() + b'{"i": "to')  # torn again: the next append cuts it
    append_jsonl(log, {"i": "next"})
    assert read_jsonl(log) == [*whole, {"i": "next"}]


def test_library_errors_inside_a_write_pass_through_unchanged(tmp_path):
    with pytest.raises(DataError, match="bad rows") as e, atomic_path(tmp_path / "x.json"):
        try:
            open(tmp_path / "missing")
        except FileNotFoundError:
            raise DataError("bad rows") from None
    assert type(e.value) is DataError and not list(tmp_path.iterdir())


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_path(tmp_path / "ck") as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    assert {"a.bin", "b.bin", "sub", "ck"} <= set(synced[:-1])  # ck: the temporary, by its name
    assert synced[-1] == tmp_path.name  # then the folder holding the renamed artifact


def test_iter_jsonl_numbers_lines_and_names_bad_ones(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{oops\n"\xff"\n[2]\n')
    got = list(iter_jsonl(path))
    assert [(n, v) for n, v, _ in got] == [(1, {"a": 1}), (4, None), (5, None), (6, [2])]
    assert [bad and bad.split(" (")[0] for _, _, bad in got] == [
        None,
        "not valid JSON",
        "not valid UTF-8",
        None,
    ]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount rights; skipped otherwise), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_no_space_left_on_device_is_reported_and_the_old_artifact_kept(small_disk):
    write_json(small_disk / "scores.json", {"v": 1})
    with pytest.raises(
        ArtifactError,
        match=rf"could not write {small_disk}/scores.json: "
        "No space left on device",
    ):
        write_json(small_disk / "scores.json", {"v": ["x" * 1000] * 100})
    assert read_json(small_disk / "scores.json") == {"v": 1}
    assert [p.name for p in small_disk.iterdir()] == ["scores.json"]
