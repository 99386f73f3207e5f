"""Faults done for real, and what survives them.

A `mates run` process is SIGKILLed inside stages, a writer is killed halfway through a
write, a stage meets a full disk (RLIMIT_FSIZE) and an unwritable folder, a corpus has
corrupt rows. Each time the records say what happened, nothing finished is damaged, and
a resume ends exactly where an uninterrupted run with the same seed does (`tiny_run`).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_jsonl, write_jsonl
from safetensors.torch import load_file

from mates.artifacts import TMP_SUFFIX, RunPaths, read_json
from mates.errors import RunStateError, StageFailed
from mates.run import Run

# Runs with mid-stage checkpoints every 5 steps. They do not change what is computed, so
# the results must equal `tiny_run`'s (no mid-stage checkpoints) bit for bit.
CHECKPOINTED = ("train.checkpoint_every_steps=5",)
LOGS = ("run.json", "metrics.jsonl", "events.jsonl", "run.lock")  # rewritten by design

# `python -c CRASH_CHILD POINT ARGS…` runs `mates ARGS…`, killing itself with SIGKILL in
# the middle of one artifact write (POINT): the file has been written up to half its
# size and was not yet flushed to disk nor renamed into place.
CRASH_CHILD = r"""
import os, signal, sys
from mates.cli import main

point, args = sys.argv[1], sys.argv[2:]
STEPS = {  # POINT: the temporaries fsynced, in order, by (name, folder); it dies at the last
    "checkpoint": [("model.safetensors", "stage-0")] * 4,  # stage 0's end-of-stage checkpoint
    "record": [("model.safetensors", "stage-0"), ("run.json", "")],  # run.json right after it
    "probes": [("probes.jsonl", "stage-0")],
    "selection": [("selection.json", "stage-1")],
}
steps, real_fsync = STEPS[point], os.fsync

def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    parts = path.split("/")
    name, folder = steps[0]
    if parts[-1] == name and folder in parts + [""] and any(x.endswith(".tmp") for x in parts):
        steps.pop(0)
        if not steps:
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)

os.fsync = fsync
sys.exit(main(args))
"""


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def spawn(tmp_path):
    """Start `mates …` (or CRASH_CHILD) processes; any still alive at teardown is killed by PID."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, crash: str | None = None, preexec_fn=None) -> subprocess.Popen:
        log = tmp_path / f"child-{len(procs)}.log"
        cmd = (
            [sys.executable, "-c", CRASH_CHILD, crash]
            if crash
            else [sys.executable, "-m", "mates.cli"]
        )
        with open(log, "wb") as fh:
            p = subprocess.Popen(
                [*cmd, *args, "--no-progress"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                preexec_fn=preexec_fn,
            )
        p.log = log  # type: ignore[attr-defined]
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def _output(p: subprocess.Popen) -> str:
    return p.log.read_text(errors="replace")  # type: ignore[attr-defined]


def _finish(p: subprocess.Popen, timeout: float = 240) -> str:
    p.wait(timeout)
    out = _output(p)
    assert p.returncode == 0, out
    return out


def _config_file(cfg, path: Path) -> Path:
    """The resolved config as a file `mates run` reads (JSON is YAML)."""
    path.write_text(json.dumps(cfg.model_dump(mode="json")), encoding="utf-8")
    return path


def _manifest(run_dir: Path) -> dict | None:
    try:
        return json.loads(RunPaths(run_dir).manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _stage_state(run_dir: Path, k: int) -> str | None:
    m = _manifest(run_dir)
    return m["stages"][k]["state"] if m else None


def _wait_for(p: subprocess.Popen, reached, what: str, timeout: float = 240) -> None:
    """Return as soon as `reached()` holds (polled every 2 ms) while `p` runs."""
    deadline = time.monotonic() + timeout
    while not reached():
        assert p.poll() is None, f"the process ended before {what}:\n{_output(p)}"
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.002)


def _kill(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL


def _in_state(run_dir: Path, k: int, state: str):
    return lambda: _stage_state(run_dir, k) == state


def _mid_stage_checkpoint(run_dir: Path, k: int, at_least: int):
    def reached() -> bool:
        try:
            meta = json.loads((RunPaths(run_dir).checkpoint(k) / "trainer.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return not meta["complete"] and meta["stage_step"] >= at_least

    return reached


def _selection_ids(run_dir: Path) -> list[list[str]]:
    paths = RunPaths(run_dir)
    return [
        read_json(paths.selection(k))["ids"]
        for k in range(len(read_json(paths.manifest)["stages"]))
    ]


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for p in Path(run_dir).rglob(f".*{TMP_SUFFIX}")]


def _hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run dir except the logs that are rewritten by design."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(run_dir).rglob("*"))
        if p.is_file() and p.name not in LOGS
    }


def assert_same_as_uninterrupted(run_dir: Path, reference: dict) -> None:
    """Done, with the uninterrupted run's selections, probes, scores and losses, exactly."""
    ref_dir = reference["dir"]
    m, ref = read_json(RunPaths(run_dir).manifest), reference["manifest"]
    assert m["status"] == "done" and m["error"] is None
    assert [s["state"] for s in m["stages"]] == ["done"] * len(ref["stages"])
    assert _selection_ids(run_dir) == _selection_ids(ref_dir)
    for k in range(len(ref["stages"]) - 1):
        for artifact in (RunPaths.probes, RunPaths.scores):
            assert read_jsonl(artifact(RunPaths(run_dir), k)) == read_jsonl(
                artifact(RunPaths(ref_dir), k)
            )
    for st, ref_st in zip(m["stages"], ref["stages"], strict=True):
        for key in ("steps", "tokens", "heldout_loss", "reference_loss", "train_loss"):
            assert st["metrics"][key] == ref_st["metrics"][key], (st["stage"], key)
    rows = read_jsonl(RunPaths(run_dir).metrics)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps))  # rows logged past a resumed checkpoint were dropped
    strip = [{k: v for k, v in r.items() if k != "time"} for r in rows]
    assert strip == [
        {k: v for k, v in r.items() if k != "time"} for r in read_jsonl(RunPaths(ref_dir).metrics)
    ]
    assert not _temporaries(run_dir)  # what the killed processes left was cleared


# --------------------------------------------------------------------------- 1. trainer killed


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(
    tiny_run, tiny_config_factory, tmp_path, spawn
):
    cfg = tiny_config_factory(*CHECKPOINTED)
    out = tmp_path / "killed"
    config = _config_file(cfg, tmp_path / "tiny.json")

    # 1. mid-stage, after a mid-stage checkpoint was written
    p = spawn("run", str(config), "--out", str(out))
    _wait_for(p, _mid_stage_checkpoint(out, 0, at_least=10), "a mid-stage checkpoint")
    with pytest.raises(RunStateError, match=rf"being executed by another process \(pid {p.pid}\)"):
        Run.open(out, progress=False).execute()  # a second executor refuses while one lives
    _kill(p)
    m = _manifest(out)
    assert m["status"] == "running" and m["stages"][0]["state"] == "training"  # stale, as left
    ck = read_json(RunPaths(out).checkpoint(0) / "trainer.json")
    assert ck["complete"] is False and ck["stage_step"] in (10, 15)

    # 2. during probing, 3. during fitting, 4. during scoring (stage 1 this time)
    for k, state in ((0, "probing"), (1, "fitting"), (1, "scoring")):
        p = spawn("resume", str(out))
        _wait_for(p, _in_state(out, k, state), f"stage {k} {state}")
        _kill(p)
        m = _manifest(out)
        assert m["status"] == "running" and m["stages"][k]["state"] == state

    _finish(spawn("resume", str(out)))
    assert_same_as_uninterrupted(out, tiny_run)


# --------------------------------------------------------------------------- 2. killed mid-write


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_nothing_that_looks_complete(
    tiny_run, tiny_config_factory, tmp_path, spawn
):
    cfg = tiny_config_factory(*CHECKPOINTED)
    out = tmp_path / "torn"
    paths = RunPaths(out)
    config = _config_file(cfg, tmp_path / "tiny.json")

    # the end-of-stage checkpoint replacing the one of step 15: the old one survives whole
    p = spawn("run", str(config), "--out", str(out), crash="checkpoint")
    assert p.wait(240) == -signal.SIGKILL, _output(p)
    ck = read_json(paths.checkpoint(0) / "trainer.json")
    assert (ck["stage_step"], ck["complete"]) == (15, False)
    assert load_file(paths.checkpoint(0) / "model.safetensors")  # intact, loadable
    torn = [t / "checkpoint" / "model.safetensors" for t in _temporaries(paths.stage(0))]
    assert (
        len(torn) == 1
        and 0 < torn[0].stat().st_size < (paths.checkpoint(0) / "model.safetensors").stat().st_size
    )

    # run.json, after the end-of-stage checkpoint and before it records the stage's metrics
    p = spawn("resume", str(out), crash="record")
    assert p.wait(240) == -signal.SIGKILL, _output(p)
    assert read_json(paths.checkpoint(0) / "trainer.json")["complete"] is True
    assert "steps" not in read_json(paths.manifest)["stages"][0]["metrics"]

    p = spawn("resume", str(out), crash="probes")
    assert p.wait(240) == -signal.SIGKILL, _output(p)
    assert read_json(paths.manifest)["stages"][0]["metrics"]["steps"] == 20  # recorded on resume
    assert not paths.probes(0).exists() and _stage_state(out, 0) == "probing"
    assert any(t.name.startswith(".probes.jsonl.") for t in _temporaries(paths.stage(0)))

    p = spawn("resume", str(out), crash="selection")
    assert p.wait(240) == -signal.SIGKILL, _output(p)
    assert not paths.selection(1).exists() and _stage_state(out, 0) == "selecting"
    torn = [t / "selection.json" for t in _temporaries(paths.stage(1))]
    assert len(torn) == 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(torn[0].read_text())  # the torn half, which no reader ever sees

    _finish(spawn("resume", str(out)))
    assert_same_as_uninterrupted(out, tiny_run)


# --------------------------------------------------------------------------- 3. disk full, unwritable


@pytest.fixture
def stage0_done(tiny_config_factory, tmp_path):
    """A run of the tiny config whose stage 0 is done (in this process), and its file hashes."""
    out = tmp_path / "run"
    run = Run(tiny_config_factory(), out, progress=False)
    run.prepare()
    run._run_stage(0)
    assert _stage_state(out, 0) == "done" and _stage_state(out, 1) == "pending"
    return out, _hashes(out)


def _limit_file_size(max_bytes: int):
    def apply() -> None:  # in the child, before exec: writes past max_bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def _assert_failed_writing(
    run_dir: Path, p: subprocess.Popen, artifact: Path, reasons: tuple[str, ...]
):
    p.wait(240)
    out = _output(p)
    assert p.returncode == 2, out
    m = read_json(RunPaths(run_dir).manifest)
    assert m["status"] == "failed" and m["stages"][1]["state"] == "failed", m["error"]
    for text in (m["error"], m["stages"][1]["error"], out):
        assert str(artifact) in text and any(r in text for r in reasons), text
    assert read_jsonl(RunPaths(run_dir).events)[-1]["event"] == "failed"
    assert not artifact.exists() and not _temporaries(run_dir)


@pytest.mark.slow
def test_disk_full_fails_the_stage_naming_the_file_and_damages_nothing(
    tiny_run, stage0_done, spawn
):
    out, before = stage0_done
    # room for run.json and the logs, not for a 360 kB model file
    p = spawn("resume", str(out), preexec_fn=_limit_file_size(200_000))
    _assert_failed_writing(out, p, RunPaths(out).checkpoint(1), ("File too large", "No space left"))
    assert (
        _hashes(out) == before
    )  # stage 0's checkpoint, probes, model, scores; stage 1's pool, selection

    _finish(spawn("resume", str(out)))  # the disk has room again
    assert_same_as_uninterrupted(out, tiny_run)


@pytest.mark.slow
def test_unwritable_stage_folder_fails_the_stage_and_damages_nothing(tiny_run, stage0_done, spawn):
    out, before = stage0_done
    folder = RunPaths(out).stage(1)
    # root ignores permission bits; the immutable attribute binds root too
    lock = ["chattr", "+i", str(folder)] if os.geteuid() == 0 else None
    if lock:
        done = subprocess.run(lock, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot make a folder unwritable for root here: {done.stderr.strip()}")
    else:
        folder.chmod(0o555)
    try:
        p = spawn("resume", str(out))
        _assert_failed_writing(
            out, p, RunPaths(out).checkpoint(1), ("Permission denied", "Operation not permitted")
        )
    finally:
        if lock:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)
    assert _hashes(out) == before

    _finish(spawn("resume", str(out)))
    assert_same_as_uninterrupted(out, tiny_run)


# --------------------------------------------------------------------------- 4. corrupt corpus rows


CORRUPT = {  # kind: (the line, the message naming it)
    "bad-json": (b'{"id": "bad", "text": ', "not valid JSON"),
    "no-text": (b'{"id": "bad", "body": "text under another key"}', "missing or non-string `text`"),
    "duplicate-id": (None, "duplicate id"),  # a copy of the first row
    "not-utf8": (b'{"id": "bad", "text": "caf\xe9 latin-1"}', "not valid UTF-8"),
}
BAD_LINE = 5


def _corrupt_pool(cfg, tmp_path: Path, kinds) -> Path:
    """The demo pool with one corrupt line of each kind, the first at line BAD_LINE."""
    lines = Path(cfg.data.pool).read_bytes().splitlines()
    bad = [CORRUPT[kind][0] or lines[0] for kind in kinds]
    return write_jsonl(tmp_path / "pool.jsonl", lines[: BAD_LINE - 1] + bad + lines[BAD_LINE - 1 :])


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_corpus_row_fails_the_run_naming_file_and_line(tiny_config_factory, tmp_path, kind):
    cfg = tiny_config_factory()
    pool = _corrupt_pool(cfg, tmp_path, [kind])
    cfg = tiny_config_factory(f"data.pool={pool}")
    out = tmp_path / "run"
    with pytest.raises(StageFailed) as e:
        Run(cfg, out, progress=False).execute()
    where = f"{pool}:{BAD_LINE}: {CORRUPT[kind][1]}"
    assert where in str(e.value)
    m = read_json(RunPaths(out).manifest)
    assert m["status"] == "failed" and where in m["error"]
    assert not RunPaths(out).tokenized.exists()


def test_skipped_corrupt_rows_are_counted_in_run_json_and_logged(
    tiny_config_factory, tmp_path, caplog
):
    cfg = tiny_config_factory()
    ids = [row["id"] for row in read_jsonl(cfg.data.pool)]
    pool = _corrupt_pool(cfg, tmp_path, list(CORRUPT))
    cfg = tiny_config_factory(f"data.pool={pool}", "data.on_bad_row=skip")
    run = Run(cfg, tmp_path / "run", progress=False)
    run.prepare()
    assert run.corpus.ids == ids  # the good rows, in order, the first of the duplicates kept
    corpus = read_json(RunPaths(tmp_path / "run").manifest)["corpus"]
    assert corpus["documents"] == len(ids) and corpus["skipped_rows"] == 4
    assert corpus["skip_reasons"] == {
        "not valid JSON": 1,
        "missing or non-string `text`": 1,
        "duplicate id": 1,
        "not valid UTF-8": 1,
    }
    assert any(
        "4 rows of" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records
    )
