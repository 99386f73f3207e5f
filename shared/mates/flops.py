"""Analytic FLOPs of each phase of a staged run: the compute ledger.

Conventions (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, app. B): N counts the
weights and biases of a model's linear layers (the matmuls; embedding look-ups and norms
are left out). A forward pass costs 2·N FLOPs per token plus 4·L·d·T for attention
scores and values at context T; a training step three times a forward, 6·N + 12·L·d·T
per token. The LM's output layer (d·V) runs only on scored positions in evaluations and
reference losses (`lm.lm_loss`), so those count it per scored token, not per input token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from mates.ngram import NgramEncoder


def linear_params(model: torch.nn.Module) -> int:
    """Weights and biases of every `nn.Linear` in the model."""
    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        for p in m.parameters(recurse=False)
    )


@dataclass(frozen=True)
class TransformerCost:
    """Per-token FLOPs of one transformer at context `seq_tokens`."""

    params: int  # N: linear-layer parameters, output layer included
    num_layers: int
    hidden_size: int
    seq_tokens: int
    head_params: int = 0  # the part of N that runs only on scored positions (LM output layer)

    @property
    def attention(self) -> int:
        return 4 * self.num_layers * self.hidden_size * self.seq_tokens

    def forward(self, tokens: int, scored: int | None = None) -> float:
        """Forward over `tokens` inputs; the head only over `scored` of them (default all)."""
        scored = tokens if scored is None else scored
        body = self.params - self.head_params
        return float(tokens * (2 * body + self.attention) + scored * 2 * self.head_params)

    def train(self, tokens: int) -> float:
        """Forward and backward over `tokens`, every position scored (6·N + 12·L·d·T)."""
        return float(tokens * (6 * self.params + 3 * self.attention))


def lm_cost(
    model: PreTrainedModel, num_layers: int, hidden_size: int, seq_tokens: int
) -> TransformerCost:
    head = model.get_output_embeddings()
    return TransformerCost(
        linear_params(model),
        num_layers,
        hidden_size,
        seq_tokens,
        head_params=sum(p.numel() for p in head.parameters()),
    )


def encoder_cost(encoder: PreTrainedModel | NgramEncoder, max_tokens: int) -> TransformerCost:
    """A BERT-style encoder from its HF config (layers, width) at `max_tokens`. A bag of
    hashed n-grams (`mates.ngram`) costs a few operations per word, counted as 4: hashing a
    word and its bigram, two count updates (its 2-FLOP "weight" stands for those)."""
    c = encoder.config
    if getattr(encoder, "bag_of_ngrams", False):
        return TransformerCost(2, 0, c.hidden_size, max_tokens)
    return TransformerCost(linear_params(encoder), c.num_hidden_layers, c.hidden_size, max_tokens)


def exact_probe_flops(
    lm: TransformerCost, doc_tokens: int, ref_tokens: int, ref_scored: int
) -> float:
    """One exact probe: a training step on the document, then the reference loss after it."""
    return lm.train(doc_tokens) + lm.forward(ref_tokens, ref_scored)


def first_order_probe_flops(lm: TransformerCost, doc_tokens: int) -> float:
    """One first-order probe: the document's gradient (the reference gradient is per stage)."""
    return lm.train(doc_tokens)


def reference_gradient_flops(lm: TransformerCost, ref_tokens: int, ref_scored: int) -> float:
    """Forward and backward of the reference loss (the backward costs twice the forward)."""
    return 3 * lm.forward(ref_tokens, ref_scored)
