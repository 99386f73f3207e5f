"""`mates probe-agreement`: first-order vs exact probes on a run's checkpoints, read-only."""

from __future__ import annotations

import hashlib
import json

import pytest

from mates.agreement import format_table, probe_agreement, probeable_stages
from mates.cli import main
from mates.errors import ConfigError
from mates.run import Run


def _digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_rows_per_stage_and_lr_and_the_run_is_untouched(tiny_run):
    before = _digest(tiny_run["dir"])
    rows = probe_agreement(tiny_run["dir"], lrs=[1e-4, 1e-3], probes=6)
    stages = probeable_stages(Run.open(tiny_run["dir"], progress=False))
    assert stages == list(range(tiny_run["cfg"].stages.num_stages - 1))
    assert [(r["stage"], r["lr"]) for r in rows] == [(k, lr) for k in stages for lr in (1e-4, 1e-3)]
    for r in rows:
        assert r["probes"] == 6
        assert -1 <= r["first_order_spearman"] <= 1 and -1 <= r["first_order_shift_spearman"] <= 1
        assert 0 <= r["clipped_fraction"] <= 1
    # at a small probe lr the step is nearly linear: first-order ranks like exact
    assert min(r["first_order_spearman"] for r in rows if r["lr"] == 1e-4) >= 0.8
    assert _digest(tiny_run["dir"]) == before
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1


def test_cli_writes_json_and_refuses_missing_stages(tiny_run, tmp_path, capsys):
    out = tmp_path / "agreement.json"
    assert (
        main(
            [
                "probe-agreement",
                str(tiny_run["dir"]),
                "--lrs",
                "1e-4",
                "--probes",
                "4",
                "--stages",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stage"], r["lr"]) for r in rows] == [(0, 1e-4)]
    assert "Spearman first-order" in capsys.readouterr().out
    assert main(["probe-agreement", str(tiny_run["dir"]), "--stages", "7"]) == 2
    assert "stage(s) [7]" in capsys.readouterr().err


def test_bad_arguments_are_named(tiny_run):
    with pytest.raises(ConfigError, match="positive"):
        probe_agreement(tiny_run["dir"], lrs=[0.0], probes=4)
    with pytest.raises(ConfigError, match="at least 3"):
        probe_agreement(tiny_run["dir"], lrs=[1e-4], probes=2)
