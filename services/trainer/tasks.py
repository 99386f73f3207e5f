"""`train_stage(run_id, stage, generation)`: train, checkpoint, probe, hand on.

After training, the stage's checkpoint is probed (oracle influences written to the
artifact store) and `fit_influence_model` is enqueued; the random arm selects
here and enqueues the next stage; the last stage exports the final model.
"""

from __future__ import annotations

import logging

from services.common.settings import get_settings
from services.worker.celery_app import app
from services.worker.dispatch import enqueue
from services.worker.tasks import TRANSIENT, StageTask, get_store, stage_done, wanted

log = logging.getLogger(__name__)


@app.task(name="mates.train_stage", base=StageTask, bind=True)
def train_stage(self, run_id: str, stage: int, generation: int) -> str:
    with wanted(run_id, stage, generation) as run:
        if run is None:
            return "skipped"
        last = stage + 1 == run.cfg.stages.num_stages
        with run.guard(stage, transient=TRANSIENT):
            run.prepare()
            if stage_done(run, stage):
                after = "last" if last else "next"
            else:
                run.train_stage(stage)
                after = run.after_training(stage)
            if after == "last":
                run.finish()
        if after == "fit":
            enqueue(get_settings(), get_store(), run_id, "fit_influence_model", stage, generation)
        elif after == "next":
            enqueue(get_settings(), get_store(), run_id, "train_stage", stage + 1, generation)
        log.info("run %s stage %d trained; next: %s", run_id, stage, after)
        return after
    return "cancelled"
