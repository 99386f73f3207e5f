"""Training a stage: the LM held in memory, the training loop's callbacks (evaluation,
checkpoint, cancel, progress: one concern each), the cooldown evaluation branch, and the
export of the final model."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from mates.artifacts import (
    append_jsonl,
    atomic_path,
    read_json,
    read_jsonl,
    repair_log,
    write_json,
    write_jsonl,
)
from mates.context import Context
from mates.data.packing import PackedStream
from mates.flops import TransformerCost, lm_cost
from mates.lm import build_lm, reference_loss, resolve_precision, row_losses
from mates.train import Callback, StepInfo, Trainer

DDP_CANCEL_EVERY = 10  # steps between cancel checks under torchrun (each is a device sync)


class LM:
    """The language model a process holds, and which state it is in: `at` is (stage,
    stage_step) when it equals that checkpoint, None mid-stage."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.trainer: Trainer | None = None
        self.at: tuple[int, int] | None = None
        self.stream: PackedStream | None = None  # the stream of the stage being trained

    def build(self) -> Trainer:
        cfg, ctx = self.ctx.cfg, self.ctx
        torch.manual_seed(cfg.seed)
        model = build_lm(cfg.model, len(ctx.tokenizer), cfg.train.seq_tokens, ctx.eos)
        return Trainer(model, cfg.train, ctx.device)

    def held(self) -> Trainer:
        if self.trainer is None:
            self.trainer = self.build()
        return self.trainer

    def forget(self) -> None:
        """Memory may hold a half-trained stage (after a failure or cancel)."""
        self.at = None

    def load_end_of(self, k: int) -> Trainer:
        """The model as stage k ended."""
        trainer = self.held()
        if self.at != (k, self.ctx.stage_steps(k)):
            trainer.load(self.ctx.paths.checkpoint(k))
            self.at = (k, self.ctx.stage_steps(k))
        return trainer

    def start_of(self, k: int) -> dict | None:
        """Hold the state from which stage k (re)starts; returns the checkpoint meta if loaded."""
        ctx = self.ctx
        trainer = self.held()
        ck = ctx.paths.checkpoint(k)
        if (ck / "trainer.json").is_file():
            meta = trainer.load(ck)
            self.at = (k, meta["stage_step"])
            truncate_metrics(ctx, meta["step"])
            return meta
        if k == 0:
            if self.at != (0, 0):
                self.trainer = self.build()
                self.at = (0, 0)
                truncate_metrics(ctx, 0)
            return None
        if self.at != (k - 1, ctx.stage_steps(k - 1)):
            meta = trainer.load(ctx.paths.checkpoint(k - 1))
            self.at = (k - 1, meta["stage_step"])
            truncate_metrics(ctx, meta["step"])
        return None

    def cost(self) -> TransformerCost:
        m = self.ctx.cfg.model
        return lm_cost(
            self.held().model, m.num_layers, m.hidden_size, self.ctx.cfg.train.seq_tokens
        )

    def eval_flops(self, ref) -> float:
        """A forward over a token set whose loss is taken on its scored tokens only."""
        return self.cost().forward(int(ref.lengths.sum()), ref.scored_tokens)

    def save_checkpoint(
        self, k: int, stage_step: int, complete: bool, losses_since_log: Sequence[float] = ()
    ) -> None:
        assert self.trainer is not None and self.stream is not None
        if self.ctx.primary:
            # the losses since the last log row too: the next row's train_loss averages them
            self.trainer.save(
                self.ctx.paths.checkpoint(k),
                {
                    "stage": k,
                    "stage_step": stage_step,
                    "complete": complete,
                    "stream": self.stream.state_dict(),
                    "losses_since_log": list(losses_since_log),
                },
            )
        self.at = (k, stage_step)


def truncate_metrics(ctx: Context, step: int) -> None:
    """Drop metric rows logged after the state being resumed from."""
    path = ctx.paths.metrics
    if path.is_file() and ctx.primary:
        repair_log(path)
        write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= step])


def evaluate(ctx: Context, model: PreTrainedModel, k: int, step: int, tokens: int) -> dict:
    """Reference and held-out losses of `model`: one row of metrics.jsonl."""
    tc = ctx.cfg.train
    sets = {
        name: round(reference_loss(model, ref, tc.eval_batch_sequences, tc.precision), 5)
        for name, ref in ctx.heldouts.items()
    }
    return {
        "stage": k,
        "step": step,
        "tokens": tokens,
        "time": time.time(),
        "reference_loss": round(
            reference_loss(model, ctx.reference, tc.eval_batch_sequences, tc.precision), 5
        ),
        "heldout_loss": sets[ctx.cfg.data.primary],
        "heldout": sets,
    }


# -- the training loop's callbacks, one concern each ---------------------------


class Evaluation(Callback):
    """Every `eval_every_steps` and at the stage end: a metrics row with the train loss
    averaged since the previous one (rank 0 writes; the others drop their losses)."""

    def __init__(self, ctx: Context, stage: int, losses: Sequence[float] = ()):
        self.ctx, self.stage = ctx, stage
        self.losses = list(losses)  # train losses since the last row (restored on resume)

    def step_end(self, trainer: Trainer, info: StepInfo) -> None:
        self.losses.extend(info.losses)  # read back at log, eval and checkpoint steps only
        every = self.ctx.cfg.train.eval_every_steps
        if info.stage_step % every == 0 and info.stage_step < self.ctx.stage_steps(self.stage):
            self.log(trainer, info)

    def train_end(self, trainer: Trainer, info: StepInfo | None) -> None:
        if info is not None:
            self.log(trainer, info)

    def log(self, trainer: Trainer, info: StepInfo) -> None:
        if self.ctx.primary:
            row = evaluate(self.ctx, trainer.model, self.stage, info.step, info.tokens)
            row.update(train_loss=round(float(np.mean(self.losses)), 5), lr=info.lr)
            append_jsonl(self.ctx.paths.metrics, row)
            if self.ctx.tracker is not None:
                self.ctx.tracker.metrics_row(row)
        self.losses.clear()


class Checkpoint(Callback):
    """Every `checkpoint_every_steps` inside the stage, with the losses since the last
    metrics row (the stage end's checkpoint is the caller's)."""

    def __init__(self, lm: LM, stage: int, evaluation: Evaluation):
        self.lm, self.stage, self.evaluation = lm, stage, evaluation

    def step_end(self, trainer: Trainer, info: StepInfo) -> None:
        ctx = self.lm.ctx
        ck = ctx.cfg.train.checkpoint_every_steps
        if ck and info.stage_step % ck == 0 and info.stage_step < ctx.stage_steps(self.stage):
            self.lm.save_checkpoint(
                self.stage, info.stage_step, complete=False, losses_since_log=self.evaluation.losses
            )


class CancelCheck(Callback):
    """Stop at the next step once a cancel is asked: alone, a stat per step; under DDP the
    ranks agree through an all-reduce whose read-back waits for the device, so only every
    DDP_CANCEL_EVERY steps."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def step_end(self, trainer: Trainer, info: StepInfo) -> None:
        if self.ctx.world_size == 1 or info.stage_step % DDP_CANCEL_EVERY == 0:
            self.ctx.check_cancel()


class Progress(Callback):
    """A progress bar of the stage's steps with the last read-back loss."""

    def __init__(self, ctx: Context, stage: int, start: int):
        self.bar = tqdm(
            total=ctx.stage_steps(stage),
            initial=start,
            desc=f"stage {stage} train",
            disable=not ctx.progress,
            leave=False,
        )

    def step_end(self, trainer: Trainer, info: StepInfo) -> None:
        self.bar.update(1)
        if info.losses:
            self.bar.set_postfix(loss=f"{info.losses[-1]:.3f}")

    def train_end(self, trainer: Trainer, info: StepInfo | None) -> None:
        self.bar.close()


# -- a stage's training --------------------------------------------------------


def stream_of(ctx: Context, k: int) -> PackedStream:
    ids = read_json(ctx.paths.selection(k))["ids"]
    return PackedStream(
        ctx.corpus,
        ctx.corpus.indices_of(ids),
        ctx.cfg.train.seq_tokens,
        ctx.eos,
        seed=ctx.cfg.seed * 1000 + k,
    )


def train(ctx: Context, lm: LM, k: int) -> None:
    """Train stage k on its selection from where it stands (a mid-stage checkpoint, the
    previous stage's end, or the start), checkpoint its end, record its metrics."""
    meta = lm.start_of(k)
    trainer = lm.held()
    stream = stream_of(ctx, k)
    start, losses = 0, []
    if meta:
        stream.load_state_dict(meta["stream"])
        start, losses = meta["stage_step"], meta.get("losses_since_log", [])
    if not (meta and meta.get("complete")):
        if trainer.step == 0 and not ctx.paths.metrics.is_file() and ctx.primary:
            append_jsonl(ctx.paths.metrics, evaluate(ctx, trainer.model, 0, 0, 0))
        lm.stream = stream
        lm.at = None  # mid-stage until the end-of-stage checkpoint is written
        evaluation = Evaluation(ctx, k, losses)
        # progress first, cancel last: a cancel stops after this step's row and checkpoint
        callbacks = [
            Progress(ctx, k, start),
            evaluation,
            Checkpoint(lm, k, evaluation),
            CancelCheck(ctx),
        ]
        trainer.train(stream, ctx.stage_steps(k), callbacks, stage_step=start)
        lm.save_checkpoint(k, ctx.stage_steps(k), complete=True)
        ctx.barrier()
    # also when resuming from an end-of-stage checkpoint whose record a killed process missed
    if ctx.primary and "steps" not in ctx.manifest.stage(k)["metrics"]:
        last = read_jsonl(ctx.paths.metrics)[-1]
        ctx.manifest.update_metrics(
            k,
            steps=trainer.step,
            tokens=trainer.tokens,
            heldout_loss=last["heldout_loss"],
            reference_loss=last["reference_loss"],
            train_loss=last.get("train_loss"),
            selection_epochs=stream.epochs_started + 1,
            precision=resolve_precision(ctx.cfg.train.precision, ctx.device),
        )
        tc = ctx.cfg.train
        ctx.record_flops(
            k, "train", lm.cost().train(ctx.stage_steps(k) * tc.batch_sequences * tc.seq_tokens)
        )


def cooldown_eval(ctx: Context, lm: LM, k: int) -> None:
    """Branch from stage k's end, decay the lr linearly to zero over `train.cooldown_fraction`
    of a stage on its own selection, evaluate every held-out set, discard the branch."""
    frac = ctx.cfg.train.cooldown_fraction
    # rank 0 alone under torchrun: nothing in here may enter a collective (no cancel check)
    if not frac or not ctx.primary or ctx.paths.cooldown(k).is_file():
        return
    t0 = time.perf_counter()
    trainer = lm.load_end_of(k)
    tc = ctx.cfg.train
    steps = max(1, round(frac * ctx.stage_steps(k)))
    ids = read_json(ctx.paths.selection(k))["ids"]
    stream = PackedStream(
        ctx.corpus,
        ctx.corpus.indices_of(ids),
        tc.seq_tokens,
        ctx.eos,
        seed=ctx.cfg.seed * 1000 + k + 500_000,
    )
    branch = trainer.cooldown_branch(stream, steps)
    sets = {}
    eval_flops = 0.0
    for name, ref in ctx.heldouts.items():
        sums, counts, correct = row_losses(branch, ref, tc.eval_batch_sequences, tc.precision)
        docs = ref.docs.numpy()
        doc_sums = np.bincount(docs, weights=sums.numpy(), minlength=ref.num_docs)
        doc_counts = np.bincount(docs, weights=counts.numpy(), minlength=ref.num_docs)
        kind = ctx.heldout_specs[name].kind
        sets[name] = {
            "kind": kind,
            "loss": round(float(sums.sum() / counts.sum()), 5),
            "accuracy": round(float(correct.float().mean()), 5) if kind == "cloze" else None,
            "scored_tokens": int(counts.sum()),
            "documents": int(ref.num_docs),
            "doc_sums": [round(float(x), 4) for x in doc_sums],
            "doc_counts": [int(x) for x in doc_counts],
        }
        eval_flops += lm.eval_flops(ref)
    del branch
    seconds = time.perf_counter() - t0
    cooldown_tokens = steps * tc.batch_sequences * tc.seq_tokens
    primary = ctx.cfg.data.primary
    write_json(
        ctx.paths.cooldown(k),
        {
            "stage": k,
            "step": trainer.step,
            "tokens": trainer.tokens,
            "cooldown_steps": steps,
            "cooldown_tokens": cooldown_tokens,
            "primary": primary,
            "seconds": round(seconds, 3),
            "sets": sets,
        },
    )
    ctx.manifest.add_timing(k, "cooldown_eval", seconds)
    ctx.manifest.update_metrics(
        k, cooldown={n: v["loss"] for n, v in sets.items()} | {"primary": primary, "steps": steps}
    )
    ctx.record_flops(k, "cooldown_eval", lm.cost().train(cooldown_tokens) + eval_flops)


def export(ctx: Context, lm: LM) -> None:
    """The final LM in `save_pretrained` form, loadable by AutoModelForCausalLM."""
    trainer = lm.load_end_of(ctx.cfg.stages.num_stages - 1)
    with atomic_path(ctx.paths.export()) as tmp:
        trainer.model.save_pretrained(tmp)
        ctx.tokenizer.save_pretrained(tmp)
    ctx.manifest.data["export"] = str(ctx.paths.export())
    ctx.manifest.save()
