"""The straightforward ways the optimized paths are benchmarked against (`mates bench`).

Only the bench and the tests that check the fast paths against them use these; the
pipeline never does. Each gives the same results as its fast counterpart (to fp32
rounding), the slow way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from mates.config import TrainConfig
from mates.data.packing import PackedStream
from mates.errors import ConfigError
from mates.influence import InfluenceScorer
from mates.lm import build_lm
from mates.train import Trainer, make_optimizer, world

if TYPE_CHECKING:
    from mates.run import Run


@torch.no_grad()
def naive_predict(scorer: InfluenceScorer, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """The straightforward way, kept as the baseline `fast_predict` is measured against.

    Batches in arrival order, each tokenized inside the loop and padded to
    `max_tokens` (the global maximum of any set with a document that reaches it),
    fp32 whatever `scorer.precision` says, under `no_grad` rather than
    `inference_mode`.
    """
    scorer.model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = scorer.tokenizer(
            list(texts[start : start + batch_size]),
            padding="max_length",
            truncation=True,
            max_length=scorer.max_tokens,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"].to(scorer.device), enc["attention_mask"].to(scorer.device)
        out.append(scorer.model(ids, mask).float().cpu())  # (B,)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


class NaiveTrainer(Trainer):
    """The straightforward loop that `Trainer` is benchmarked against, on the same batches.

    fp32 whatever `train.precision` says, the plain per-parameter AdamW and gradient
    clip (no foreach, no fused kernel), eager attention, the loss the HF way
    (`model(input_ids, labels=...)`: full-vocabulary logits at every position), and a
    host sync per micro-batch to read the loss. Same step math as `Trainer` (decay
    groups, lr schedule, clip, accumulation), so the loss trajectories agree in fp32.
    Single process only. It switches the model it is given to eager attention.
    """

    def __init__(self, model: PreTrainedModel, cfg: TrainConfig, device: torch.device):
        if world()[1] > 1:
            raise ConfigError(
                "NaiveTrainer is a single-process benchmark baseline; run it without torchrun"
            )
        model.set_attn_implementation("eager")
        super().__init__(
            model, cfg.model_copy(update={"precision": "fp32", "compile": False}), device
        )

    @classmethod
    def for_run(cls, run: Run) -> NaiveTrainer:
        """The baseline on the model a run trains, with the same initial weights as its Trainer."""
        cfg = run.cfg
        torch.manual_seed(cfg.seed)  # as Run._build_trainer
        model = build_lm(cfg.model, len(run.tokenizer), cfg.train.seq_tokens, run.eos)
        return cls(model, cfg.train, run.device)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, self.cfg, self.device, fast=False)

    def train_step(self, stream: PackedStream) -> float:  # type: ignore[override]
        n_micro = self._begin_step()
        total = 0.0
        for x, y in self._micro_batches(stream):
            # labels are already shifted (y[t] is x[t]'s target), so hand them over as such
            y = y.contiguous()  # HF views the labels flat
            loss = self.model(input_ids=x, labels=y, shift_labels=y).loss / n_micro
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, foreach=False)
        self._end_step()
        return total
