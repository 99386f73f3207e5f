"""`mates serve trainer`: a Celery worker on the `train` queue, one job at a time.

The device comes from the run's config (`device: auto` takes the GPU when one is
present). Run one trainer per GPU (`CUDA_VISIBLE_DEVICES` picks it), or one per
machine with `MATES_TRAINER_NPROC=N` to train each stage with DDP on N GPUs.
"""

from __future__ import annotations

from services.common.contracts import TRAIN
from services.common.lifecycle import rescue_stalled_runs
from services.common.queue import run_worker


def serve() -> None:
    run_worker([TRAIN], "solo", 1, "trainer", watch_also=(rescue_stalled_runs,))
