"""One training loop with named hooks, and checkpoints that continue exactly."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from mates.artifacts import atomic_path
from mates.config import TrainConfig
from mates.data.packing import PackedStream
from mates.errors import ArtifactError, ConfigError, StageFailed
from mates.lm import autocast, lm_loss

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    step: int  # global optimizer steps done
    stage_step: int  # steps done in this stage
    tokens: int  # global training tokens seen
    loss: float
    lr: float
    seconds: float


class Callback:
    """Named hooks of the training loop; override what you need."""

    def step_end(self, trainer: Trainer, info: StepInfo) -> None: ...

    def train_end(self, trainer: Trainer, info: StepInfo | None) -> None: ...


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with decay on matrices only (norms and biases are not decayed)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


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


class _LossModule(torch.nn.Module):
    """The LM's training loss as a module, so DDP sees the forward it synchronizes."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.lm, x, y)


class Trainer:
    """Owns the model, the optimizer and the step/token counters across stages.

    Under `torchrun` (an initialized process group of N ranks) the step runs with DDP:
    every rank draws the same micro-batch from the same seeded stream and trains on
    its 1/N of the rows; gradients are averaged, so the step equals the single-process
    step on the whole batch, and every rank's stream, model and optimizer stay identical.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.step = 0
        self.tokens = 0
        self.rank, self.world_size = world()
        self._loss: torch.nn.Module = _LossModule(self.model)
        if self.world_size > 1:
            micro = cfg.micro_batch_sequences or cfg.batch_sequences
            if micro % self.world_size:
                raise ConfigError(
                    f"`train.micro_batch_sequences` (or `train.batch_sequences`) = {micro} must be "
                    f"divisible by the {self.world_size} DDP processes")
            ids = [torch.cuda.current_device() if device.index is None else device.index] \
                if device.type == "cuda" else None
            self._loss = DistributedDataParallel(self._loss, device_ids=ids)

    @property
    def current_lr(self) -> float:
        return lr_at(self.step, self.cfg)

    def _micro_batches(self, stream: PackedStream):
        micro = self.cfg.micro_batch_sequences or self.cfg.batch_sequences
        for _ in range(self.cfg.batch_sequences // micro):
            x, y = stream.next_batch(micro)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_step(self, stream: PackedStream) -> float:
        """One optimizer step over `batch_sequences` packed sequences; returns the mean loss."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_lr
        n_micro = self.cfg.batch_sequences // (self.cfg.micro_batch_sequences or self.cfg.batch_sequences)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(self._micro_batches(stream)):
            if self.world_size > 1:  # this rank's share of the rows
                x, y = x[self.rank :: self.world_size], y[self.rank :: self.world_size]
            sync = self.world_size == 1 or i == n_micro - 1
            ctx = self._loss.no_sync() if not sync else contextlib.nullcontext()
            with ctx:  # forward and backward both inside: DDP reduces on the last micro-batch
                with autocast(self.device, self.cfg.precision):
                    loss = self._loss(x, y) / n_micro
                loss.backward()
            total += loss.detach()
        if self.world_size > 1:
            dist.all_reduce(total)
            total /= self.world_size
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.cfg.batch_sequences * self.cfg.seq_tokens
        return float(total)

    def train(self, stream: PackedStream, steps: int, callbacks: list[Callback],
              stage_step: int = 0) -> StepInfo | None:
        """Run `steps - stage_step` more steps; a non-finite loss fails the stage."""
        info = None
        for s in range(stage_step, steps):
            t0 = time.perf_counter()
            loss = self.train_step(stream)
            if not math.isfinite(loss):
                raise StageFailed(f"non-finite training loss ({loss}) at step {self.step}")
            info = StepInfo(self.step, s + 1, self.tokens, loss, self.optimizer.param_groups[0]["lr"],
                            time.perf_counter() - t0)
            for cb in callbacks:
                cb.step_end(self, info)
        for cb in callbacks:
            cb.train_end(self, info)
        return info

    # -- checkpoints ---------------------------------------------------------

    def save(self, path: Path, extra: dict) -> None:
        """Model, optimizer, counters, RNG and caller state (data cursor, stage) atomically."""
        with atomic_path(path) as tmp:
            tmp.mkdir()
            state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, tmp / "model.safetensors")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            # the lr schedule is a pure function of the step, so step + these settings are its state
            schedule = {"kind": "linear-warmup-constant", "lr": self.cfg.lr,
                        "warmup_steps": self.cfg.warmup_steps}
            meta = {"step": self.step, "tokens": self.tokens, "lr_schedule": schedule, **extra}
            (tmp / "trainer.json").write_text(json.dumps(meta), encoding="utf-8")

    def load(self, path: Path) -> dict:
        """Restore a checkpoint written by `save`; returns its caller state."""
        path = Path(path)
        try:
            meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
            self.model.load_state_dict(load_file(path / "model.safetensors", device=str(self.device)))
            opt_state = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
            rng = torch.load(path / "rng.pt", weights_only=True)
            self.optimizer.load_state_dict(opt_state)
        except Exception as e:  # safetensors, pickle and torch raise many unrelated types
            raise ArtifactError(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}") from e
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
        return meta
