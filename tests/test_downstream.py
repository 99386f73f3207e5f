"""`mates eval`: lm-evaluation-harness run for real on the tiny run's exported LM, over a
local task built from the run's own held-out data; offline, nothing downloaded."""

from __future__ import annotations

import json
import shutil

import pytest

from mates.cli import main
from mates.downstream import HELDOUT_TASK, EvalError, evaluate

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """A copy of the tiny run (the shared one stays read-only): eval writes beside it."""
    dest = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(tiny_run["dir"], dest, ignore=shutil.ignore_patterns("tokenized"))
    return dest


def test_the_final_model_and_a_stage_are_evaluated_and_recorded(run_copy, capsys):
    assert main(["eval", str(run_copy), "--tasks", HELDOUT_TASK, "--limit", "12"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{HELDOUT_TASK}: acc,none ")
    final = json.loads((run_copy / "eval" / "final.json").read_text())
    acc = final["tasks"][HELDOUT_TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0 and final["limit"] == 12 and final["stage"] is None
    # the task itself: four choices per held-out cloze example, the true one among them
    rows = [json.loads(x) for x in (run_copy / "eval" / "tasks" / f"{HELDOUT_TASK}.jsonl").open()]
    assert rows and all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)

    record = evaluate(run_copy, [HELDOUT_TASK], stage=0, limit=12)
    assert (run_copy / "eval" / "models" / "stage-0" / "model.safetensors").is_file()
    saved = json.loads((run_copy / "eval" / "stage-0.json").read_text())
    assert saved == json.loads(json.dumps(record)) and saved["stage"] == 0


def test_bad_tasks_are_named(run_copy, tmp_path):
    with pytest.raises(EvalError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate(run_copy, ["no_such_task"], limit=2, out=tmp_path / "x.json")
    # one of lm-eval's own tasks, whose data set is on the Hub and not here
    with pytest.raises(EvalError, match=r"lambada_openai.*available locally"):
        evaluate(run_copy, ["lambada_openai"], limit=2, out=tmp_path / "y.json")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
    assert main(["eval", str(run_copy), "--tasks", "no_such_task"]) == 2
