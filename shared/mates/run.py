"""One MATES run: stages of train → probe → fit → score → select, resumable from artifacts.

Each step of a stage is skipped when its artifact already exists, so a resumed
run continues from the last completed step. Stage k trains on `selection(k)`;
its checkpoint is probed, an influence model is fitted and scores stage k+1's
pool, and the selection for stage k+1 is written. Stage 0 trains on a random
selection; the random arm selects at random throughout.

`Run` is the algorithm in order; each step's work is a function of its own module in
`mates.stages`, over the `Context` built once per process (`mates.context`). The run
directory's manifest and lock are `mates.run_dir`'s; the device and the DDP process group
`mates.distributed`'s (`init_run`, `resolve_device` and `init_distributed` are importable
from here too).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mates.artifacts import RunPaths, read_json, remove_stale_temporaries
from mates.config import RunConfig, config_from_dict
from mates.context import Cancelled, Context
from mates.distributed import DIST_TIMEOUT, init_distributed, resolve_device
from mates.errors import MatesError, RunStateError, StageFailed
from mates.influence import Encoder
from mates.manifest import Manifest, RunStatus, StageState
from mates.run_dir import hold_run_dir, init_run, open_manifest
from mates.stages import fitting, probing, scoring, selecting, sharing, training
from mates.tracking import open_tracker
from mates.train import Trainer, world

__all__ = [
    "DIST_TIMEOUT",
    "Cancelled",
    "Run",
    "init_distributed",
    "init_run",
    "resolve_device",
    "train_stage_process",
]

log = logging.getLogger(__name__)


def train_stage_process(run_dir: Path, k: int) -> None:
    """Train stage k of an existing run in this process: alone, or as one rank under
    `torchrun --nproc-per-node N` (DDP: gloo on CPU, NCCL on CUDA; rank 0 writes)."""
    started = False
    run: Run | None = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        manifest = read_json(RunPaths(Path(run_dir)).manifest)
        init_distributed(str(manifest["config"].get("device", "auto")))
        started = True
    try:
        run = Run.open(Path(run_dir), progress=False)
        if run.manifest.stage(k)["state"] != StageState.DONE:
            with run.guard(k):
                run.prepare()
                run.train_stage(k)
    finally:
        if started:
            # Drop the DDP reducer before the process group: tearing both down together at
            # exit deadlocked gloo's threads on the GIL now and then.
            run = None
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


class Run:
    """One run: the stage functions the services call one task at a time, and `execute()`,
    which drives them all in one process."""

    def __init__(self, cfg: RunConfig, out_dir: Path, *, progress: bool = True):
        paths = RunPaths(Path(out_dir))
        device = resolve_device(cfg.device)  # before the run dir is touched
        rank, world_size = world()
        manifest = open_manifest(cfg, paths)
        manifest.readonly = rank != 0
        self.ctx = Context(cfg, paths, manifest, device, rank, world_size, progress)
        self.lm = training.LM(self.ctx)
        self.model = fitting.ModelSlot()

    # The context's fields, read through the run.
    cfg = property(lambda self: self.ctx.cfg)
    paths = property(lambda self: self.ctx.paths)
    manifest = property(lambda self: self.ctx.manifest)
    device = property(lambda self: self.ctx.device)
    progress = property(lambda self: self.ctx.progress)
    primary = property(lambda self: self.ctx.primary)
    world_size = property(lambda self: self.ctx.world_size)
    tokenizer = property(lambda self: self.ctx.tokenizer)
    corpus = property(lambda self: self.ctx.corpus)
    reference = property(lambda self: self.ctx.reference)
    heldouts = property(lambda self: self.ctx.heldouts)
    eos = property(lambda self: self.ctx.eos)

    def stage_steps(self, k: int) -> int:
        return self.ctx.stage_steps(k)

    def check_cancel(self) -> None:
        self.ctx.check_cancel()

    @classmethod
    def open(cls, run_dir: Path, progress: bool = True) -> Run:
        """Re-open an existing run dir with the config it was created with."""
        m = read_json(RunPaths(Path(run_dir)).manifest)
        return cls(config_from_dict(m["config"]), run_dir, progress=progress)

    def prepare(self) -> None:
        """Build (or read back) the tokenizer, corpus and reference sets; 'label' checks its
        target here, before any training."""
        self.ctx.prepare()
        if self.cfg.selection.method == "label":
            selecting.label_mask(self.ctx)

    # -- the algorithm, in one process --------------------------------------------

    def execute(
        self,
        seed_stage0_from: Path | None = None,
        prepared_from: Path | None = None,
        probes_from: Path | None = None,
    ) -> Manifest:
        """Run (or resume) every stage to the end in this process; returns the final manifest.

        `seed_stage0_from` copies stage 0 from another arm's run; that run, or
        `prepared_from`, also lends its tokenizer and tokenized corpus when its data settings
        are the same. `probes_from`, a model-based arm sharing that stage 0, lends the
        stage-0 probes and influence model (the same computation on the same checkpoint)."""
        with hold_run_dir(self.paths.lock, self.manifest):
            self._begin(seed_stage0_from, prepared_from, probes_from)
            self.ctx.tracker = open_tracker(
                self.cfg, self.paths.root, self.manifest.run_id, self.ctx.primary
            )
            try:
                n = self.cfg.stages.num_stages
                for k in range(n):
                    if self.manifest.stage(k)["state"] != StageState.DONE:
                        with self.guard(k):
                            self._run_stage(k)
                        self._track_stage(k)
                with self.guard(n - 1):
                    self.finish()
            finally:
                if self.ctx.tracker is not None:
                    self.ctx.tracker.close()
                    self.ctx.tracker = None
            return self.manifest

    def _track_stage(self, k: int) -> None:
        if self.ctx.tracker is not None:
            stages = self.manifest.data["stages"]
            tokens = int(stages[k]["metrics"].get("tokens", 0))
            self.ctx.tracker.stage_end(k, stages, tokens)

    def _run_stage(self, k: int) -> None:
        """The same stage functions the services call, one after another."""
        self.train_stage(k)
        if self.after_training(k) == "fit":
            self.fit_stage(k)
            self.begin_scoring(k)
            for shard in range(self.num_shards(k)):
                self.score_shard(k, shard)
                self.check_cancel()
            self.select_stage(k)

    def _begin(
        self, seed_stage0_from: Path | None, prepared_from: Path | None, probes_from: Path | None
    ) -> None:
        if self.manifest.data["status"] == RunStatus.DONE:
            raise RunStateError(f"run {self.manifest.run_id} is already done")
        removed = remove_stale_temporaries(self.paths.root)
        if removed:
            log.info("removed %d temporaries left by an interrupted process", removed)
        self.paths.cancel.unlink(missing_ok=True)
        self.manifest.set_status(RunStatus.RUNNING)
        with self.guard(0):
            lender = seed_stage0_from or prepared_from
            if lender is not None:
                sharing.copy_prepared(self.ctx, Path(lender))
            self.prepare()
            if seed_stage0_from is not None:
                sharing.copy_stage0(self.ctx, Path(seed_stage0_from))
                if probes_from is not None:
                    sharing.copy_stage0_probes(self.ctx, Path(probes_from))

    # -- the stage functions ----------------------------------------------------
    # Each is skipped where its artifact exists, so calling one twice does no work twice.
    # `prepare()` must have run in this process first.

    def train_stage(self, k: int) -> None:
        """Train stage k on its selection (stage 0 first draws its pool and a random one)."""
        ctx = self.ctx
        ctx.check_cancel()
        if (
            self.manifest.stage(k)["state"] != StageState.DONE
            and self.manifest.data["status"] != RunStatus.RUNNING
        ):
            self.manifest.set_status(RunStatus.RUNNING)
        if k == 0 and not self.paths.selection(0).is_file():
            if ctx.primary:
                selecting.write_pool(ctx, 0)
                selecting.select(ctx, 0, scores=None, method="random")
            ctx.barrier()
        with self._state(k, StageState.TRAINING):
            training.train(ctx, self.lm, k)
        training.cooldown_eval(ctx, self.lm, k)

    def after_training(self, k: int) -> str:
        """What follows stage k's training: 'fit' once probes are written, else stage k is done.

        The last stage ends here ('last'); the random arm, or a selection for stage k+1 that
        already exists, ends it too ('next').
        """
        ctx, p = self.ctx, self.paths
        ctx.check_cancel()
        if k + 1 == self.cfg.stages.num_stages:
            self.manifest.transition(k, StageState.DONE)
            return "last"
        if not p.pool(k + 1).is_file():
            selecting.write_pool(ctx, k + 1)
        if not p.selection(k + 1).is_file() and not self.cfg.selection.model_based:
            with self._state(k, StageState.SELECTING):
                selecting.select_without_model(ctx, self.lm, k + 1)
        if p.selection(k + 1).is_file():
            self.manifest.transition(k, StageState.DONE)
            return "next"
        if self.cfg.selection.method == "static" and k > 0:
            return "fit"  # stage 0's model is reused: nothing to probe
        with self._state(k, StageState.PROBING):
            if not p.probes(k).is_file():
                probing.probe(ctx, self.lm, k)
        return "fit"

    def fit_stage(self, k: int) -> Path:
        """Fit the data influence model to stage k's probes; returns its directory."""
        self.check_cancel()
        with self._state(k, StageState.FITTING):
            if not (self.paths.influence_model(k) / "meta.json").is_file():
                fitting.fit(self.ctx, self.model, k)
        return self.paths.influence_model(k)

    def begin_scoring(self, k: int) -> None:
        if not self.manifest.moved_past(k, StageState.SCORING):
            self.manifest.transition(k, StageState.SCORING)

    def num_shards(self, k: int) -> int:
        """Scoring shards of stage k+1's pool."""
        return scoring.num_shards(self.ctx, k)

    def shard_ids(self, k: int, shard: int) -> list[str]:
        return scoring.shard_ids(self.ctx, k, shard)

    def score_shard(
        self,
        k: int,
        shard: int,
        score_texts: Callable[[list[str], list[str]], Sequence[float]] | None = None,
    ) -> Path:
        """Score one shard of stage k+1's pool with stage k's influence model, here or
        through `score_texts(ids, texts)` (the HTTP scorer); returns the shard's file."""
        return scoring.score_shard(self.ctx, self.model, k, shard, score_texts)

    def select_stage(self, k: int) -> None:
        """Merge the shard scores, select stage k+1's documents and close stage k."""
        ctx, p = self.ctx, self.paths
        if not p.selection(k + 1).is_file():
            st = self.manifest.stage(k)
            if "scoring" not in st["timings"]:
                started = [t["at"] for t in st["transitions"] if t["state"] == StageState.SCORING]
                if started:
                    self.manifest.add_timing(k, "scoring", time.time() - started[-1])
            if not p.scores(k).is_file():
                scoring.merge(ctx, k)
            per_doc = st["metrics"].get("encoder_flops_per_doc")
            if per_doc is not None:  # every pool document counted at influence.max_tokens
                ctx.record_flops(k, "score", per_doc * len(read_json(p.pool(k + 1))["ids"]))
            with self._state(k, StageState.SELECTING):
                selecting.select_with_model(ctx, k)
        self.manifest.transition(k, StageState.DONE)

    def finish(self) -> None:
        """Export the final model and mark the run done."""
        self._export()
        self.manifest.set_status(RunStatus.DONE)

    def _export(self) -> None:
        training.export(self.ctx, self.lm)

    # -- reading the run's state ------------------------------------------------------

    def new_encoder(self) -> tuple[Encoder, Any]:
        """(encoder, tokenizer) of `influence.encoder` for this run (see `fitting.new_encoder`)."""
        return fitting.new_encoder(self.ctx)

    def probe_documents(self, k: int):
        return probing.probe_documents(self.ctx, k)

    def evaluate(self, k: int, step: int, tokens: int) -> dict:
        return training.evaluate(self.ctx, self.lm.held().model, k, step, tokens)

    def _build_trainer(self) -> Trainer:
        return self.lm.build()

    def _fit_rows(self, k: int):
        return fitting.fit_rows(self.ctx, k)

    # -- failure and cancellation ----------------------------------------------

    @contextmanager
    def guard(self, k: int, transient: tuple[type[BaseException], ...] = ()):
        """Record a failure or cancellation inside the block on stage k and the run.

        Exceptions of the `transient` types pass through unrecorded: the caller retries.
        A library error is re-raised as StageFailed naming the stage. Guards do not nest.
        """
        try:
            yield
        except transient:
            raise
        except Cancelled as e:
            self.mark_cancelled(k, str(e))
            raise
        except Exception as e:
            self.mark_failed(k, f"{type(e).__name__}: {e}")
            if isinstance(e, MatesError):
                raise StageFailed(f"stage {k} failed: {e}") from e
            raise

    def mark_cancelled(self, k: int, reason: str = "run cancelled by request") -> None:
        self.lm.forget()
        self.manifest.end(k, RunStatus.CANCELLED, reason)

    def mark_failed(self, k: int, reason: str) -> None:
        self.lm.forget()
        self.manifest.end(k, RunStatus.FAILED, reason)
        self.ctx.event(k, "failed", reason=reason)

    @contextmanager
    def _state(self, k: int, state: StageState):
        """Stage k in `state` for the block, timed; a stage already past it (a re-delivered
        task repeating a step) keeps its state, and the step finds its artifact."""
        if self.manifest.moved_past(k, state):
            yield
            return
        self.manifest.transition(k, state)
        t0 = time.perf_counter()
        yield
        self.manifest.add_timing(k, state, time.perf_counter() - t0)
