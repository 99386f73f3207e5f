"""Exact oracle data influence: one AdamW step on one example, reference loss after minus before.

`I(x) = L(D_ref | θ after one step on x) − L(D_ref | θ)`; lower is more helpful.
The weights and AdamW state are snapshotted in memory once per checkpoint and
restored bit-exactly after every probe (the reference code reloads the
checkpoint from disk for every probe; we never do).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mates.data.reference import ReferenceSet
from mates.lm import autocast, lm_loss, reference_loss

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """Copies of parameters and optimizer state tensors, and the param groups' scalars."""

    params: list[torch.Tensor]
    opt_state: list[dict[str, torch.Tensor]]
    groups: list[dict]


def take_snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = []
    for p in model.parameters():
        st = optimizer.state.get(p, {})
        opt_state.append({k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return Snapshot(params, opt_state, groups)


@torch.no_grad()
def restore_snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, snap: Snapshot) -> None:
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
    for g, saved in zip(optimizer.param_groups, snap.groups, strict=True):
        g.update(saved)


class ExactOracle:
    """Measures exact one-step influences on the reference set at a fixed checkpoint."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 reference: ReferenceSet, *, lr: float, grad_clip: float, precision: str,
                 eval_batch_sequences: int):
        self.model = model
        self.optimizer = optimizer
        self.device = next(model.parameters()).device
        self.reference = reference.to(self.device)
        self.lr = lr
        self.grad_clip = grad_clip
        self.precision = precision
        self.eval_batch = eval_batch_sequences
        self.snapshot = take_snapshot(model, optimizer)
        self.base_loss = self._ref_loss()
        self.clipped = 0  # probes whose gradient norm exceeded the clip

    def _ref_loss(self) -> float:
        return reference_loss(self.model, self.reference, self.eval_batch, self.precision)

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

    def influence(self, tokens: torch.Tensor) -> float:
        """Influence of one example (its token IDs, EOS-terminated, at most seq+1 long)."""
        if tokens.numel() < 2:
            raise ValueError("a probe example needs at least 2 tokens")
        try:
            self._one_step(tokens)
            return self._ref_loss() - self.base_loss
        finally:
            restore_snapshot(self.model, self.optimizer, self.snapshot)
