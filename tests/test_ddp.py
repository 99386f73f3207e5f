"""DDP: `torchrun --nproc-per-node 2 mates train-stage` on CPU (gloo) matches one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import read_jsonl

from mates.artifacts import RunPaths, read_json
from mates.run import init_run

pytestmark = pytest.mark.slow


def _train_stage0(run_dir, nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        argv = [sys.executable, "-m", "mates.cli", "train-stage", str(run_dir), "0"]
    else:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "mates.cli",
            "train-stage",
            str(run_dir),
            "0",
        ]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_two_process_ddp_matches_one_process(tiny_config_factory, tmp_path):
    cfg = tiny_config_factory("stages.stage0_steps=12", "train.eval_every_steps=4")
    single = init_run(cfg, tmp_path / "single").path.parent
    ddp = tmp_path / "ddp" / single.name
    shutil.copytree(single, ddp)
    _train_stage0(single, 1)
    _train_stage0(ddp, 2)

    a, b = read_jsonl(RunPaths(single).metrics), read_jsonl(RunPaths(ddp).metrics)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 4, 8, 12]  # rank 0 logs once
    for ra, rb in zip(a, b, strict=True):
        assert rb["heldout_loss"] == pytest.approx(ra["heldout_loss"], abs=2e-4)
        if "train_loss" in ra:
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=2e-4)
    ma, mb = read_json(RunPaths(single).manifest), read_json(RunPaths(ddp).manifest)
    assert ma["stages"][0]["state"] == mb["stages"][0]["state"] == "training"
    assert ma["stages"][0]["metrics"]["tokens"] == mb["stages"][0]["metrics"]["tokens"]
    assert read_json(RunPaths(ddp).checkpoint(0) / "trainer.json")["complete"] is True


def test_the_trainer_service_trains_a_stage_under_torchrun(tiny_config_factory, tmp_path):
    """`MATES_TRAINER_NPROC=2`: the stage job trains in torchrun, the store follows, and the
    job goes on to probe from the checkpoint the ranks wrote."""
    pytest.importorskip("celery")
    from mates.run import Run
    from services.common.settings import Settings
    from services.common.store import Store
    from services.trainer.tasks import train_with_torchrun

    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    manifest = init_run(tiny_config_factory("stages.stage0_steps=8"), tmp_path / "artifacts")
    store.create_run(manifest.data, str(manifest.path.parent))
    run = Run.open(manifest.path.parent, progress=False)
    run.manifest.on_save = store.sync_manifest
    run.prepare()
    fresh = train_with_torchrun(
        run, 0, Settings(trainer_nproc=2, trainer_timeout_s=300, api_key="x" * 16), store
    )
    row = store.get_run(manifest.run_id)
    assert row["status"] == "running"
    assert [t["state"] for t in row["stages"][0]["transitions"]] == ["pending", "training"]
    assert row["stages"][0]["metrics"]["steps"] == 8
    assert fresh.after_training(0) == "fit"  # probes written from the DDP checkpoint
    assert fresh.paths.probes(0).is_file()
    assert store.get_run(manifest.run_id)["stages"][0]["state"] == "probing"


def _joined(monkeypatch, device: str, gpus: int, local_rank: int) -> list:
    """What `init_distributed` asks of torch.distributed, on a machine with `gpus` GPUs."""
    import torch
    import torch.distributed as dist

    from mates import run

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout))
    )
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    run.init_distributed(device)
    return calls


def test_a_cpu_run_joins_with_gloo_even_on_a_gpu_machine(monkeypatch):
    from mates.run import DIST_TIMEOUT

    assert _joined(monkeypatch, "cpu", gpus=1, local_rank=1) == [("gloo", DIST_TIMEOUT)]
    assert _joined(monkeypatch, "cuda", gpus=2, local_rank=1) == [
        ("set_device", 1),
        ("nccl", DIST_TIMEOUT),
    ]
    assert _joined(monkeypatch, "auto", gpus=0, local_rank=0) == [("gloo", DIST_TIMEOUT)]


def test_a_cuda_rank_without_a_gpu_of_its_own_is_a_config_error(monkeypatch):
    from mates.errors import ConfigError

    with pytest.raises(ConfigError, match="local rank 1 has no GPU of its own: this machine has 1"):
        _joined(monkeypatch, "cuda", gpus=1, local_rank=1)
