"""The base both oracles build on (`_Oracle`): the model at a checkpoint, the reference set,
the probe step's settings, and the reference loss influences are measured by."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from mates.data.reference import ReferenceSet
from mates.lm import reference_loss


class _Oracle:
    """What every oracle holds: the model at a checkpoint, the reference set and the probe step."""

    def __init__(
        self,
        model: PreTrainedModel,
        reference: ReferenceSet,
        *,
        lr: float,
        grad_clip: float,
        precision: str,
        eval_batch_sequences: int,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.reference = reference.to(self.device)
        self.lr = lr
        self.grad_clip = grad_clip
        self.precision = precision
        self.eval_batch = eval_batch_sequences
        self.clipped = 0  # probes whose gradient norm exceeded the clip

    def _ref_loss(self) -> float:
        return reference_loss(self.model, self.reference, self.eval_batch, self.precision)

    @staticmethod
    def _check_probe(tokens: torch.Tensor) -> None:
        if tokens.numel() < 2:
            raise ValueError("a probe example needs at least 2 tokens")
