"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mates.config import ModelConfig, TrainConfig
from mates.data.reference import IGNORE, ReferenceSet
from mates.lm import build_lm, lm_loss
from mates.train import make_optimizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_CONFIG = CONFIGS / "tiny.yaml"


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSONL; a `bytes` or `str` row is written verbatim (for corrupt-row tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for row in rows:
            if isinstance(row, bytes):
                fh.write(row.rstrip(b"\n") + b"\n")
            elif isinstance(row, str):
                fh.write(row.rstrip("\n").encode("utf-8") + b"\n")
            else:
                fh.write(json.dumps(row).encode("utf-8") + b"\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


# --------------------------------------------------------------------------- tiny LM pieces


TINY_MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)


def tiny_train_config(**kw) -> TrainConfig:
    base = dict(
        seq_tokens=16,
        batch_sequences=4,
        lr=1e-3,
        warmup_steps=0,
        precision="fp32",
        eval_batch_sequences=8,
    )
    base.update(kw)
    return TrainConfig(**base)


TINY_VOCAB, TINY_SEQ = 64, 16  # the probe tests' tiny LM: vocabulary and sequence length


def synthetic_reference(n: int, scored: int, seed: int = 0) -> ReferenceSet:
    """`n` random rows of TINY_SEQ tokens whose last `scored` targets count (LAMBADA-style)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (n, TINY_SEQ), generator=g)
    labels = torch.full((n, TINY_SEQ), IGNORE, dtype=torch.long)
    labels[:, TINY_SEQ - scored - 1 : TINY_SEQ - 1] = ids[:, TINY_SEQ - scored :]
    return ReferenceSet(ids, labels, torch.full((n,), TINY_SEQ), "synthetic")


def warm_tiny_lm(steps: int = 3, device: str = "cpu"):
    """A tiny GPT-NeoX whose AdamW already has moments and step counts (a real checkpoint)."""
    torch.manual_seed(0)
    model = build_lm(TINY_MODEL, TINY_VOCAB, TINY_SEQ, eos_id=0).to(device)
    opt = make_optimizer(model, tiny_train_config(), torch.device(device))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        block = torch.randint(1, TINY_VOCAB, (4, TINY_SEQ + 1), generator=g).to(device)
        lm_loss(model, block[:, :-1], block[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for group in opt.param_groups:
        group["lr"] = 7e-4  # the train lr at this checkpoint; the probe uses its own
    return model, opt


def random_tokens(seed: int, length: int = TINY_SEQ + 1) -> torch.Tensor:
    return torch.randint(1, TINY_VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


class FakeCorpus:
    """What `PackedStream` needs of a `TokenizedCorpus`: token IDs by document index."""

    def __init__(self, docs: list[list[int]]):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]

    def __len__(self) -> int:
        return len(self.docs)

    def token_ids(self, i: int) -> np.ndarray:
        return self.docs[i]


def random_docs(
    n_docs: int, vocab: int, seed: int, min_len: int = 5, max_len: int = 40, low: int = 1
) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(low, vocab, size=int(rng.integers(min_len, max_len))).tolist()
        for _ in range(n_docs)
    ]
