"""`mates serve trainer`: a Celery worker on the `train` queue, one job at a time.

It uses the GPU when one is present (`MATES_DEVICE=auto`), the CPU otherwise.
Run one trainer per GPU (`CUDA_VISIBLE_DEVICES` picks it).
"""

from __future__ import annotations

from services.worker.celery_app import TRAIN, _worker


def serve() -> None:
    _worker([TRAIN], "solo", 1, "trainer")
