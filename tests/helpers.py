"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mates.config import ModelConfig, TrainConfig

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
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


# --------------------------------------------------------------------------- tiny LM pieces


TINY_MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)


def tiny_train_config(**kw) -> TrainConfig:
    base = dict(seq_tokens=16, batch_sequences=4, lr=1e-3, warmup_steps=0, precision="fp32",
                eval_batch_sequences=8)
    base.update(kw)
    return TrainConfig(**base)


class FakeCorpus:
    """What `PackedStream` needs of a `TokenizedCorpus`: token IDs by document index."""

    def __init__(self, docs: list[list[int]]):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]

    def __len__(self) -> int:
        return len(self.docs)

    def token_ids(self, i: int) -> np.ndarray:
        return self.docs[i]


def random_docs(n_docs: int, vocab: int, seed: int, min_len: int = 5, max_len: int = 40,
                low: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab, size=int(rng.integers(min_len, max_len))).tolist()
            for _ in range(n_docs)]
