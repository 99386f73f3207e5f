"""One training loop with named hooks, and checkpoints that continue exactly.

The step keeps the host off the device's critical path: the loss stays a device tensor
and is read back (one sync) every `train.log_every_steps`, at eval and checkpoint steps
and at the end of `train()`. A non-finite loss therefore fails the stage at the next
read-back, naming the first step whose loss was non-finite, not at that step itself;
no checkpoint or eval hook ever runs on weights past an unchecked loss.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from mates.artifacts import atomic_path
from mates.config import TrainConfig
from mates.data.reference import IGNORE
from mates.errors import ArtifactError, ConfigError, StageFailed
from mates.lm import autocast

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    step: int  # global optimizer steps done
    stage_step: int  # steps done in this stage
    tokens: int  # global training tokens seen
    loss_tensor: torch.Tensor  # this step's mean loss, 0-d, still on the device
    lr: float
    seconds: float  # host time of the step (on CUDA the device may still be working on it)
    # Read back at this step: the losses of the steps since the previous read-back, oldest
    # first, this step's last; empty between read-backs (see `Trainer.train`).
    losses: tuple[float, ...] = ()

    @property
    def loss(self) -> float:
        """This step's mean loss; between read-backs, reading it costs a host-device sync."""
        return self.losses[-1] if self.losses else float(self.loss_tensor)


class Callback:
    """Named hooks of the training loop; override what you need."""

    def step_end(self, trainer: Trainer, info: StepInfo) -> None: ...

    def train_end(self, trainer: Trainer, info: StepInfo | None) -> None: ...


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device, fast: bool = True
) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norms and biases are not decayed).

    `fast`: the fused kernel (one kernel for all parameters; CUDA, and CPU since torch
    2.4, where it measured ~4x faster than foreach on the demo model); otherwise the
    plain per-parameter loop, the baseline of `mates.baselines.NaiveTrainer`.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if not fast:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then constant (the paper's schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BlockStream(Protocol):
    """What the trainer draws its batches from: a `mates.data.packing.PackedStream`, or the
    bench's random tokens."""

    def next_block(self, n_sequences: int) -> torch.Tensor:
        """(n_sequences, T + 1) token IDs: inputs and labels overlap by all but one."""
        ...


class _LossModule(torch.nn.Module):
    """The LM's training loss as a module, so DDP sees the forward it synchronizes.

    Unlike `lm.lm_loss` it does not gather the scored positions with a boolean mask (a
    host-device sync, and a data-dependent shape that breaks a torch.compile graph):
    packed batches score every position, and `ignore_index` covers any that are not.
    """

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.base_model(input_ids=x).last_hidden_state  # (B, T, C)
        logits = self.lm.get_output_embeddings()(hidden)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)


class Trainer:
    """Owns the model, the optimizer and the step/token counters across stages.

    Under `torchrun` (an initialized process group of N ranks) the step runs with DDP:
    every rank draws the same micro-batch from the same seeded stream and trains on
    its 1/N of the rows; gradients are averaged, so the step equals the single-process
    step on the whole batch, and every rank's stream, model and optimizer stay identical.
    """

    def __init__(self, model: PreTrainedModel, cfg: TrainConfig, device: torch.device):
        # in place; Module.to is named because PreTrainedModel.to's wrapper hides its signature
        self.model = torch.nn.Module.to(model, device)
        self.cfg = cfg
        self.device = device
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.tokens = 0
        self.rank, self.world_size = world()
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet read back
        self._ddp: DistributedDataParallel | None = None
        loss: torch.nn.Module = _LossModule(self.model)
        if self.world_size > 1:
            micro = cfg.micro_batch_sequences or cfg.batch_sequences
            if micro % self.world_size:
                raise ConfigError(
                    f"`train.micro_batch_sequences` (or `train.batch_sequences`) = {micro} must be "
                    f"divisible by the {self.world_size} DDP processes"
                )
            ids = (
                [torch.cuda.current_device() if device.index is None else device.index]
                if device.type == "cuda"
                else None
            )
            loss = self._ddp = DistributedDataParallel(loss, device_ids=ids)
        # compiled once here; the parameters stay the model's, so checkpoints are unaffected
        self._loss = torch.compile(loss) if cfg.compile else loss

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, self.cfg, self.device)

    @property
    def current_lr(self) -> float:
        return lr_at(self.step, self.cfg)

    def _micro_batches(self, stream: BlockStream):
        micro = self.cfg.micro_batch_sequences or self.cfg.batch_sequences
        for _ in range(self.cfg.batch_sequences // micro):
            block = stream.next_block(micro)  # (micro, T+1): inputs and labels overlap
            if self.device.type == "cuda":
                # one copy of the contiguous block from pinned memory, truly asynchronous;
                # inputs and labels are sliced on the device (pinning the two strided views
                # would keep their strides, and their copies would go through pageable
                # temporaries)
                block = block.pin_memory().to(self.device, non_blocking=True)
            yield block[:, :-1], block[:, 1:]

    def _begin_step(self) -> int:
        """Sets the step's lr; returns the number of micro-batches."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_lr
        return self.cfg.batch_sequences // (
            self.cfg.micro_batch_sequences or self.cfg.batch_sequences
        )

    def _end_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.cfg.batch_sequences * self.cfg.seq_tokens

    def train_step(self, stream: BlockStream) -> torch.Tensor:
        """One optimizer step over `batch_sequences` packed sequences.

        Returns the mean loss as a 0-d tensor on the device; nothing in the step waits
        for the device (`float()` the result to read it, which does).
        """
        n_micro = self._begin_step()
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(self._micro_batches(stream)):
            if self.world_size > 1:  # this rank's share of the rows
                x, y = x[self.rank :: self.world_size], y[self.rank :: self.world_size]
            last = i == n_micro - 1
            ctx = (
                self._ddp.no_sync()
                if self._ddp is not None and not last
                else contextlib.nullcontext()
            )
            with ctx:  # forward and backward both inside: DDP reduces on the last micro-batch
                with autocast(self.device, self.cfg.precision):
                    loss = self._loss(x, y) / n_micro
                loss.backward()
            total += loss.detach()
        if self.world_size > 1:
            dist.all_reduce(total)
            total /= self.world_size
        # returns the norm as a tensor and scales by a clamped tensor coefficient: no sync
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self._end_step()
        return total

    def read_losses(self) -> list[float]:
        """Read back the losses of the steps since the last read-back (one host-device sync).

        Raises StageFailed naming the first step whose loss was non-finite.
        """
        if not self._pending:
            return []
        steps = [s for s, _ in self._pending]
        values = torch.stack([v for _, v in self._pending]).float().cpu().tolist()
        self._pending.clear()
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                raise StageFailed(f"non-finite training loss ({value}) at step {step}")
        return values

    def _reads_back(self, stage_step: int, steps: int) -> bool:
        """Read-back points: every `log_every_steps`, where hooks evaluate or checkpoint, at the end."""
        c = self.cfg
        return (
            stage_step == steps
            or stage_step % c.log_every_steps == 0
            or stage_step % c.eval_every_steps == 0
            or bool(c.checkpoint_every_steps and stage_step % c.checkpoint_every_steps == 0)
        )

    def train(
        self, stream: BlockStream, steps: int, callbacks: list[Callback], stage_step: int = 0
    ) -> StepInfo | None:
        """Run `steps - stage_step` more steps; a non-finite loss fails the stage.

        The check happens at the next read-back (see the module docstring), before that
        step's hooks run, so hooks see `info.losses` only of finite steps.
        """
        info = None
        self._pending.clear()  # left over from a train() that raised
        for s in range(stage_step, steps):
            t0 = time.perf_counter()
            # a tensor, left on the device; a float from NaiveTrainer (or a test's stand-in)
            loss = torch.as_tensor(self.train_step(stream), device=self.device)
            self._pending.append((self.step, loss))
            losses = tuple(self.read_losses()) if self._reads_back(s + 1, steps) else ()
            info = StepInfo(
                self.step,
                s + 1,
                self.tokens,
                loss,
                self.optimizer.param_groups[0]["lr"],
                time.perf_counter() - t0,
                losses,
            )
            for cb in callbacks:
                cb.step_end(self, info)
        for cb in callbacks:
            cb.train_end(self, info)
        return info

    def cooldown_branch(self, stream: BlockStream, steps: int) -> PreTrainedModel:
        """A copy of the model trained `steps` more steps with the lr decaying linearly from
        the current lr to zero (the decay of a warmup-stable-decay schedule); this trainer's
        model, optimizer, counters and stream are untouched. Single process: under DDP the
        primary rank calls it alone, so it never enters a collective."""
        self.read_losses()
        model = copy.deepcopy(self.model)
        opt = make_optimizer(model, self.cfg, self.device)
        # a deep copy: load_state_dict would otherwise share the moment tensors with ours
        opt.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        loss_fn = _LossModule(model)
        base = self.current_lr
        micro = self.cfg.micro_batch_sequences or self.cfg.batch_sequences
        n_micro = self.cfg.batch_sequences // micro
        model.train()
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = base * (steps - i) / steps
            for x, y in self._micro_batches(stream):
                with autocast(self.device, self.cfg.precision):
                    loss = loss_fn(x, y) / n_micro
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        return model

    # -- checkpoints ---------------------------------------------------------

    def save(self, path: Path, extra: dict) -> None:
        """Model, optimizer, counters, RNG and caller state (data cursor, stage) atomically."""
        self.read_losses()  # never checkpoint weights past an unchecked non-finite loss
        with atomic_path(path) as tmp:
            tmp.mkdir()
            state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, tmp / "model.safetensors")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            # the lr schedule is a pure function of the step, so step + these settings are its state
            schedule = {
                "kind": "linear-warmup-constant",
                "lr": self.cfg.lr,
                "warmup_steps": self.cfg.warmup_steps,
            }
            meta = {"step": self.step, "tokens": self.tokens, "lr_schedule": schedule, **extra}
            (tmp / "trainer.json").write_text(json.dumps(meta), encoding="utf-8")

    def load(self, path: Path) -> dict:
        """Restore a checkpoint written by `save`; returns its caller state."""
        path = Path(path)
        try:
            meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
            self.model.load_state_dict(
                load_file(path / "model.safetensors", device=str(self.device))
            )
            opt_state = torch.load(
                path / "optimizer.pt", map_location=self.device, weights_only=True
            )
            rng = torch.load(path / "rng.pt", weights_only=True)
            self.optimizer.load_state_dict(opt_state)
        except Exception as e:  # safetensors, pickle and torch raise many unrelated types
            raise ArtifactError(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}") from e
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            # one state per GPU the saving process saw; this process may see fewer (a
            # checkpoint from a multi-GPU machine resumed on one GPU): those it has
            for i, state in enumerate(list(rng["cuda"])[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, i)
        self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
        return meta
