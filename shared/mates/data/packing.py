"""Sequence packing: selected documents joined with EOS and cut into fixed-length sequences.

No token is padding. The stream's cursor is part of a checkpoint, so a resumed
stage sees exactly the tokens an uninterrupted one would have.
"""

from __future__ import annotations

import numpy as np
import torch

from mates.data.corpus import TokenizedCorpus


class PackedStream:
    """Endless stream of (inputs, labels) over `doc_indices` in a seeded order.

    When the documents run out, a new epoch starts with a fresh seeded order;
    `epochs_started` tells how often that happened (a selection smaller than the
    stage's token budget is repeated, never silently cut short).
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        doc_indices: np.ndarray,
        seq_tokens: int,
        eos_id: int,
        seed: int,
    ):
        if len(doc_indices) == 0:
            raise ValueError("cannot pack an empty selection")
        self.corpus = corpus
        self.doc_indices = np.asarray(doc_indices, dtype=np.int64)
        self.seq_tokens = seq_tokens
        self.eos_id = eos_id
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._order = self._epoch_order(0)
        self._buffer: list[int] = []

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return self.doc_indices[rng.permutation(len(self.doc_indices))]

    def _refill(self, need: int) -> None:
        while len(self._buffer) < need:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            doc = int(self._order[self.position])
            self.position += 1
            self._buffer.extend(self.corpus.token_ids(doc).tolist())
            self._buffer.append(self.eos_id)

    def next_block(self, n_sequences: int) -> torch.Tensor:
        """The next n sequences of T+1 tokens, (n, T+1): row i's inputs are its first T
        tokens and its labels its last T (`next_batch`)."""
        T = self.seq_tokens
        rows = []
        for _ in range(n_sequences):
            self._refill(T + 1)
            rows.append(self._buffer[: T + 1])
            del self._buffer[:T]  # the last target is the next sequence's first input
        return torch.tensor(rows, dtype=torch.long)

    def next_batch(self, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (n, T); labels are inputs shifted by one token."""
        block = self.next_block(n_sequences)
        return block[:, :-1], block[:, 1:]

    @property
    def epochs_started(self) -> int:
        return self.epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
        self._buffer = list(state["buffer"])
