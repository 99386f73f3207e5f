"""The exact oracle: one AdamW step on one example, then the reference loss, then the
weights and optimizer state restored bit-exactly from an in-memory snapshot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from mates.data.reference import ReferenceSet
from mates.lm import autocast, lm_loss
from mates.probe.oracle import _Oracle


@dataclass
class Snapshot:
    """Copies of parameters and optimizer state tensors, and the param groups' scalars."""

    params: list[torch.Tensor]
    opt_state: list[dict[str, torch.Tensor]]
    groups: list[dict]


def take_snapshot(model: PreTrainedModel, optimizer: torch.optim.Optimizer) -> Snapshot:
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = []
    for p in model.parameters():
        st = optimizer.state.get(p, {})
        opt_state.append({k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return Snapshot(params, opt_state, groups)


@torch.no_grad()
def restore_snapshot(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, snap: Snapshot
) -> None:
    """Put weights, AdamW moments, step counts and group settings back exactly."""
    for p, saved, saved_state in zip(model.parameters(), snap.params, snap.opt_state, strict=True):
        p.copy_(saved)
        p.grad = None
        if not saved_state:
            optimizer.state.pop(p, None)
            continue
        st = optimizer.state[p]
        for k, v in saved_state.items():
            st[k].copy_(v)
    for g, saved_group in zip(optimizer.param_groups, snap.groups, strict=True):
        g.update(saved_group)


class ExactOracle(_Oracle):
    """Measures exact one-step influences on the reference set at a fixed checkpoint."""

    def __init__(
        self,
        model: PreTrainedModel,
        optimizer: torch.optim.Optimizer,
        reference: ReferenceSet,
        *,
        lr: float,
        grad_clip: float,
        precision: str,
        eval_batch_sequences: int,
    ):
        super().__init__(
            model,
            reference,
            lr=lr,
            grad_clip=grad_clip,
            precision=precision,
            eval_batch_sequences=eval_batch_sequences,
        )
        self.optimizer = optimizer
        self.snapshot = take_snapshot(model, optimizer)
        self.base_loss = self._ref_loss()

    def _one_step(self, tokens: torch.Tensor) -> None:
        self.model.train()
        x = tokens[None, :-1].to(self.device)  # (1, T)
        y = tokens[None, 1:].to(self.device)
        with autocast(self.device, self.precision):
            loss = lm_loss(self.model, x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.clipped += int(norm > self.grad_clip)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def shared_effect(self) -> float:
        """The reference-loss change of the step's part that is the same for every document
        (momentum and weight decay: an AdamW step with a zero gradient), measured exactly."""
        try:
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return self._ref_loss() - self.base_loss
        finally:
            restore_snapshot(self.model, self.optimizer, self.snapshot)

    def influence(self, tokens: torch.Tensor) -> float:
        """Influence of one example (its token IDs, EOS-terminated, at most seq+1 long)."""
        self._check_probe(tokens)
        was_training = self.model.training
        try:
            self._one_step(tokens)
            return self._ref_loss() - self.base_loss
        finally:
            restore_snapshot(self.model, self.optimizer, self.snapshot)
            self.model.train(was_training)
