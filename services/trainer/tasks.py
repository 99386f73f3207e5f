"""`train_stage(run_id, stage, generation)`: train, checkpoint, probe, hand on.

After training, the stage's checkpoint is probed (oracle influences written to the
artifact store) and `fit_influence_model` is enqueued; the random arm selects
here and enqueues the next stage; the last stage exports the final model.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from celery import shared_task

from mates.artifacts import read_json
from mates.errors import StageFailed
from mates.manifest import RunStatus
from mates.run import Cancelled, Run
from services.common.contracts import Outcome
from services.common.errors import TRANSIENT
from services.common.queue import enqueue
from services.common.settings import Settings, get_settings
from services.common.stagetask import StageTask, stage_done, wanted
from services.common.store import Store, default_store

log = logging.getLogger(__name__)


@shared_task(name="mates.train_stage", base=StageTask, bind=True)
def train_stage(self, run_id: str, stage: int, generation: int) -> str:
    with wanted(run_id, stage, generation) as run:
        if run is None:
            return Outcome.SKIPPED
        last = stage + 1 == run.cfg.stages.num_stages
        with run.guard(stage, transient=TRANSIENT):
            run.prepare()
            if stage_done(run, stage):
                after = "last" if last else "next"
            else:
                if get_settings().trainer_nproc > 1:
                    run = train_with_torchrun(run, stage, get_settings(), default_store())
                else:
                    run.train_stage(stage)
                after = run.after_training(stage)
            if after == "last" and not (
                run.manifest.data["status"] == RunStatus.DONE and run.paths.export().is_dir()
            ):
                run.finish()
        if after == "fit":
            enqueue(
                get_settings(), default_store(), run_id, "fit_influence_model", stage, generation
            )
        elif after == "next":
            enqueue(get_settings(), default_store(), run_id, "train_stage", stage + 1, generation)
        log.info("run %s stage %d trained; next: %s", run_id, stage, after)
        return after
    return Outcome.CANCELLED


def train_with_torchrun(run: Run, stage: int, settings: Settings, store: Store) -> Run:
    """Train the stage in `torchrun --nproc-per-node N` (DDP), mirroring its manifest into
    the run store while it runs; returns the run re-opened from what it wrote."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={settings.trainer_nproc}",
        "-m",
        "mates.cli",
        "train-stage",
        str(run.paths.root),
        str(stage),
    ]
    log.info("run %s stage %d: %s", run.manifest.run_id, stage, " ".join(argv))
    done = threading.Event()

    def mirror() -> None:
        while not done.wait(2.0):
            try:
                store.sync_manifest(read_json(run.paths.manifest))
            except Exception:  # a torn read or a busy store: the next tick catches up
                log.debug("manifest mirror tick failed", exc_info=True)

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPUs' memory to the ranks
    watcher = threading.Thread(target=mirror, daemon=True)
    watcher.start()
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            child.wait(settings.trainer_timeout_s)
        except subprocess.TimeoutExpired:
            raise StageFailed(
                f"torchrun training of stage {stage} ran past "
                f"MATES_TRAINER_TIMEOUT_S = {settings.trainer_timeout_s:.0f}s"
            ) from None
        finally:
            if child.poll() is None:  # this task is being torn down: do not orphan the ranks
                child.terminate()
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
            done.set()
            watcher.join()
        out.seek(0)
        output = out.read()[-4000:]
    fresh = Run.open(Path(run.paths.root), progress=False)
    fresh.manifest.on_save = store.sync_manifest
    run.manifest.data = fresh.manifest.data  # the caller's guard records on what the ranks wrote
    store.sync_manifest(fresh.manifest.data)
    if child.returncode != 0:
        tail = output[-2000:]
        if fresh.manifest.data["status"] == RunStatus.CANCELLED:
            raise Cancelled("run cancelled by request")
        raise StageFailed(f"torchrun training of stage {stage} exited {child.returncode}: {tail}")
    fresh.prepare()
    return fresh
