"""The first-order oracle: `⟨∇L_ref, Δθ(x)⟩`, AdamW's update on x computed elementwise from
the optimizer's state without stepping, ∇L_ref once per checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from mates.data.reference import ReferenceSet
from mates.lm import autocast, lm_loss
from mates.probe.oracle import _Oracle


@dataclass
class _AdamBucket:
    """Parameters that share AdamW scalars (their group's settings and their step count)."""

    index: list[int]  # positions in `model.parameters()`
    params: list[torch.Tensor]  # detached views of the model's own parameters
    exp_avg: list[torch.Tensor]  # the optimizer's own m (read only; zeros where it has no state)
    exp_avg_sq: list[torch.Tensor]  # the optimizer's own v
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int  # the step count this update would use (the state's step + 1, as in torch)


def _adam_buckets(model: PreTrainedModel, optimizer: torch.optim.Optimizer) -> list[_AdamBucket]:
    """Read AdamW's hyper-parameters and state per parameter, grouped by shared scalars."""
    position = {id(p): i for i, p in enumerate(model.parameters())}
    buckets: dict[tuple[int, int], _AdamBucket] = {}
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("first-order probes support plain AdamW (no amsgrad, no maximize)")
        if group.get("weight_decay") and not group.get("decoupled_weight_decay", True):
            raise ValueError("first-order probes need decoupled weight decay (AdamW, not Adam)")
        beta1, beta2 = (float(b) for b in group["betas"])
        for p in group["params"]:
            if id(p) not in position:
                raise ValueError("the optimizer holds a parameter that is not the model's")
            st = optimizer.state.get(p, {})
            step = int(float(st["step"])) if "step" in st else 0  # a tensor in torch's layout
            m = st["exp_avg"] if st else torch.zeros_like(p)
            v = st["exp_avg_sq"] if st else torch.zeros_like(p)
            key = (gi, step)
            if key not in buckets:
                buckets[key] = _AdamBucket(
                    [],
                    [],
                    [],
                    [],
                    beta1,
                    beta2,
                    float(group["eps"]),
                    float(group["weight_decay"]),
                    step + 1,
                )
            b = buckets[key]
            b.index.append(position[id(p)])
            b.params.append(p.detach())
            b.exp_avg.append(m.detach())
            b.exp_avg_sq.append(v.detach())
    return list(buckets.values())


def _views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter views into one flat buffer (so a dot product over all of them is one op)."""
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].view(p.shape))
        start += p.numel()
    return out


class FirstOrderOracle(_Oracle):
    """First-order one-step influences: `I(x) ≈ ⟨∇L_ref(θ), Δθ(x)⟩`.

    Δθ(x) is the AdamW update one step on x alone would make from the current
    optimizer state (clipped gradient, moments, bias corrections, decoupled weight
    decay, the probe lr), computed elementwise without touching the model or the
    optimizer. ∇L_ref is computed once, so a probe costs one forward/backward on x
    plus a few elementwise passes over the parameters, instead of a step, a full
    reference evaluation and a restore.

    `shift=True` linearises at θ_s = θ + Δ_c instead, where Δ_c is the part of the
    step that is the same for every x (weight decay and the β1·m momentum with
    v' ≈ β2·v): `I(x) ≈ [L_ref(θ_s) − L_ref(θ)] + ⟨∇L_ref(θ_s), Δθ(x) − Δ_c⟩`.

    `batch=True` probes x as one member of a training batch instead of a step on x
    alone. Training never steps on one document: x adds g_x/B to a batch gradient, and
    its effect on the step is J·g_x/B with J = ∂Δθ/∂g, the AdamW update's Jacobian, at
    the batch gradient. That gradient is taken to be the momentum m (the average of the
    recent batch gradients), so per element, with s = lr/(1−β1^t), c = 1−β2^t,
    V = β2·v + (1−β2)·m², D = √(V/c) + ε:
        J = −s·[(1−β1)/D − (1−β2)·m² / (c·√(V/c)·D²)]
    and `I(x) = ⟨J ⊙ ∇L_ref, g_x⟩` (the 1/B left out: it scales every probe alike). No
    per-document clipping (the trainer clips the batch), and x's own g² never enters
    the second moment: a single-document step puts it there at full weight, which damps
    exactly the directions in which x's gradient is large.
    """

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
        shift: bool = False,
        batch: bool = False,
    ):
        super().__init__(
            model,
            reference,
            lr=lr,
            grad_clip=grad_clip,
            precision=precision,
            eval_batch_sequences=eval_batch_sequences,
        )
        if shift and batch:
            raise ValueError(
                "first-order probes linearise either after the shared step (shift) "
                "or inside a batch (batch), not both"
            )
        self.shift = shift
        self.batch = batch
        self._params: list[torch.Tensor] = list(model.parameters())
        self._buckets = _adam_buckets(model, optimizer)
        n = sum(p.numel() for p in self._params)
        # fp32 work buffers, reused by every probe: the update, its denominator, ∇L_ref
        self._delta = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._denom = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._grad_ref = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._delta_views = _views(self._delta, self._params)
        self._denom_views = _views(self._denom, self._params)
        self.base_loss = self._ref_loss()
        self._offset = 0.0  # the influence of x is `_offset + ⟨∇L_ref, Δθ(x)⟩`
        self._shifted_loss: float | None = None
        if shift:
            self._offset = self._linearise_at_shift()
        else:
            self._reference_grad()
        self._weights: torch.Tensor | None = None
        if batch:  # J ⊙ ∇L_ref, once: each probe is then one dot product with its gradient
            self._weights = torch.zeros(n, dtype=torch.float32, device=self.device)
            self._batch_jacobian(_views(self._weights, self._params))
            self._weights.mul_(self._grad_ref)

    def _reference_grad(self) -> None:
        """∇ of the mean reference loss into `_grad_ref`, batched as in `reference_loss`."""
        ref, views = self.reference, _views(self._grad_ref, self._params)
        self._grad_ref.zero_()
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(ref), self.eval_batch):
                end = min(start + self.eval_batch, len(ref))
                width = int(ref.lengths[start:end].max())
                with autocast(self.device, self.precision):
                    loss = lm_loss(
                        self.model,
                        ref.input_ids[start:end, :width],
                        ref.labels[start:end, :width],
                        reduction="sum",
                    )
                grads = torch.autograd.grad(
                    loss / ref.scored_tokens, self._params, allow_unused=True
                )
                used = [(v, g) for v, g in zip(views, grads, strict=True) if g is not None]
                torch._foreach_add_([v for v, _ in used], [g.float() for _, g in used])
        finally:
            self.model.train(was_training)

    def _linearise_at_shift(self) -> float:
        """∇L_ref at θ_s = θ + Δ_c into `_grad_ref`; returns the constant part of the influence."""
        delta_c = self._adam_delta(None)
        saved = self._denom_views  # free until the next probe: holds θ while the model is shifted
        with torch.no_grad():
            torch._foreach_copy_(saved, self._params)
        try:
            with torch.no_grad():
                torch._foreach_add_(self._params, delta_c)
            shifted_loss = self._shifted_loss = self._ref_loss()
            self._reference_grad()
        finally:
            with torch.no_grad():  # bit-exact: a copy back, not a subtraction
                torch._foreach_copy_(self._params, saved)
        return shifted_loss - self.base_loss - float(self._grad_ref.dot(self._delta))

    @torch.no_grad()
    def _adam_delta(self, grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """AdamW's update for these (clipped) gradients into `_delta`, op for op as torch's foreach path.

        `grads=None` gives Δ_c, the update with the gradient terms left out (m' = β1·m, v' = β2·v).
        """
        for b in self._buckets:
            num = [self._delta_views[i] for i in b.index]
            den = [self._denom_views[i] for i in b.index]
            torch._foreach_copy_(den, b.exp_avg_sq)
            torch._foreach_mul_(den, b.beta2)
            torch._foreach_copy_(num, b.exp_avg)
            if grads is None:
                torch._foreach_mul_(num, b.beta1)
            else:
                g = [grads[i] for i in b.index]
                torch._foreach_addcmul_(den, g, g, value=1 - b.beta2)
                torch._foreach_lerp_(num, g, 1 - b.beta1)
            torch._foreach_sqrt_(den)
            torch._foreach_div_(den, (1 - b.beta2**b.step) ** 0.5)
            torch._foreach_add_(den, b.eps)
            torch._foreach_div_(num, den)
            torch._foreach_mul_(num, -self.lr / (1 - b.beta1**b.step))
            if b.weight_decay:
                torch._foreach_add_(num, b.params, alpha=-self.lr * b.weight_decay)
        return self._delta_views

    @torch.no_grad()
    def _batch_jacobian(self, out: list[torch.Tensor]) -> None:
        """J = ∂Δθ/∂g at g = m, elementwise, into `out` (see the class docstring)."""
        for b in self._buckets:
            s, c = self.lr / (1 - b.beta1**b.step), 1 - b.beta2**b.step
            for i, m, v in zip(b.index, b.exp_avg, b.exp_avg_sq, strict=True):
                m = m.float()
                root = (b.beta2 * v.float() + (1 - b.beta2) * m * m).div_(c).sqrt_()
                den = root + b.eps
                # root = 0 only where m = v = 0, and there the second term is 0
                curvature = ((1 - b.beta2) / c) * m * m / root / den / den
                curvature = torch.where(root > 0, curvature, 0.0)
                out[i].copy_(-s * ((1 - b.beta1) / den - curvature))

    def shared_effect(self) -> float:
        """The reference-loss change of the step's part that is the same for every document
        (momentum and weight decay, Δ_c): first order, ⟨∇L_ref, Δ_c⟩; exact when `shift`."""
        if self._shifted_loss is not None:
            return self._shifted_loss - self.base_loss
        self._adam_delta(None)
        return float(self._grad_ref.dot(self._delta))

    def _clipped_grads(
        self, tokens: torch.Tensor, clip: bool = True
    ) -> tuple[list[torch.Tensor], list[int]]:
        """The training loss's gradient on one example, clipped by global norm as the trainer does
        (unless `clip` is false).

        Returns the gradients (zeros where a parameter got none) and those parameters' positions.
        """
        was_training = self.model.training
        self.model.train()
        try:
            x = tokens[None, :-1].to(self.device)  # (1, T)
            y = tokens[None, 1:].to(self.device)
            with autocast(self.device, self.precision):
                loss = lm_loss(self.model, x, y)
            raw = torch.autograd.grad(loss, self._params, allow_unused=True)
        finally:
            self.model.train(was_training)
        missing = [i for i, g in enumerate(raw) if g is None]
        # contiguous: autograd may hand back a broadcast view, which cannot be scaled in place
        grads = [
            torch.zeros_like(p, dtype=torch.float32) if g is None else g.float().contiguous()
            for p, g in zip(self._params, raw, strict=True)
        ]
        if clip:
            norm = torch.nn.utils.get_total_norm(grads)
            self.clipped += int(norm > self.grad_clip)
            torch._foreach_mul_(grads, torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
        return grads, missing

    def step_delta(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Δθ(x) per parameter (views into a buffer the next probe overwrites; clone to keep);
        with `batch`, J·g_x: x's first-order share of a batch step, times the batch size."""
        self._check_probe(tokens)
        if self.batch:
            grads, missing = self._clipped_grads(tokens, clip=False)
            with torch.no_grad():
                torch._foreach_copy_(self._delta_views, grads)
                self._batch_jacobian(self._denom_views)
                self._delta.mul_(self._denom)
            return self._delta_views
        grads, missing = self._clipped_grads(tokens)
        delta = self._adam_delta(grads)
        for i in missing:  # AdamW leaves a parameter without a gradient alone
            delta[i].zero_()
        return delta

    def influence(self, tokens: torch.Tensor) -> float:
        """First-order influence of one example (its token IDs, EOS-terminated, at most seq+1 long)."""
        if self._weights is not None:
            self._check_probe(tokens)
            grads, _ = self._clipped_grads(tokens, clip=False)
            with torch.no_grad():
                torch._foreach_copy_(self._delta_views, grads)
            return float(self._weights.dot(self._delta))
        self.step_delta(tokens)
        return self._offset + float(self._grad_ref.dot(self._delta))

    def influences(self, token_lists) -> np.ndarray:
        """Influences of many examples, in order (one forward/backward each)."""
        return np.array([self.influence(torch.as_tensor(t)) for t in token_lists], dtype=np.float64)
