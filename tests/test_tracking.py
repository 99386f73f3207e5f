"""`tracking:` for real: a tiny run writes TensorBoard event files, read back with
TensorBoard's own reader, and an offline Weights & Biases run (never a network call), its
files checked; a comparison's arms share one W&B group."""

from __future__ import annotations

import json
import os

import pytest

from mates.compare.arms import arm_config
from mates.run import Run


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    # no account, no network: W&B writes its run to disk only
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def test_a_tracked_run_writes_tensorboard_and_offline_wandb(
    tmp_path, tiny_config_factory, offline_wandb
):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config_factory(
        "tracking.tensorboard=true", "tracking.wandb=true", "tracking.wandb_mode=offline"
    )
    out = tmp_path / "run"
    manifest = Run(cfg, out, progress=False).execute()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/reference", "lr", "influence/val_spearman"} <= tags
    assert any(t.startswith("selection/share/") for t in tags)
    assert any(t.startswith("pool/share/") for t in tags)
    assert "selection/overhead_seconds" in tags
    heldout = [t for t in tags if t.startswith("loss/heldout/")]
    assert heldout
    # the reference loss at every metrics row, on the tokens axis, as in metrics.jsonl
    logged = [(e.step, round(e.value, 4)) for e in acc.Scalars("loss/reference")]
    assert logged == [
        (r["tokens"], round(r["reference_loss"], 4)) for r in rows if "train_loss" in r
    ]
    fitted = [s for s in manifest.data["stages"] if "influence_model" in s["metrics"]]
    assert len(acc.Scalars("influence/val_spearman")) == len(fitted)

    runs = [p for p in (out / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 1, list((out / "wandb").iterdir())
    assert runs[0].name.endswith(manifest.run_id)
    # the run's records, for `wandb sync` later (a protobuf log: its keys are plain bytes)
    (records,) = runs[0].glob(f"run-{manifest.run_id}.wandb")
    data = records.read_bytes()
    for key in (b"loss/reference", b"loss/train", b"influence/val_spearman", b"selection/share/"):
        assert key in data, key


def test_untracked_runs_write_nothing_and_arms_share_a_group(tmp_path, tiny_config_factory):
    cfg = tiny_config_factory("stages.num_stages=1")
    Run(cfg, tmp_path / "plain", progress=False).execute()
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert not (tmp_path / "plain" / "wandb").exists()
    arms = [arm_config(cfg, arm, 0) for arm in ("random", "mates")]
    assert {a.tracking.group for a in arms} == {cfg.name}
    # where figures go is not part of a run's identity: a run resumes with tracking on
    assert (
        cfg.fingerprint()
        == tiny_config_factory("stages.num_stages=1", "tracking.tensorboard=true").fingerprint()
    )
    assert os.environ.get("WANDB_MODE") != "online"
