"""A bag of hashed n-grams as the influence model's encoder (`influence.encoder: ngram`).

The frozen-encoder ridge head of `mates.influence` takes any fixed features; this
encoder gives it features that cost a few operations per word instead of a
transformer's forward pass, so that scoring a stage's pool costs next to nothing
beside training the LM (MiniLM's forward over a demo pool costs 17-19 times the
demo LM's training of that stage; see docs/science.md).

Features of a text, from its first `max_tokens` words (`mates.dsir.tokenize`):
- the bag: counts of its hashed unigrams and bigrams over `num_buckets` buckets
  (the hashing of `mates.dsir`), as log(1 + count), the row scaled to unit L2 norm;
- one reference feature: the mean over the text's n-grams of
  log p_ref[b] - log p_corpus[b], where p_ref and p_corpus are the add-one
  smoothed bucket distributions of the run's reference set (the oracle's target)
  and of its whole training corpus (DSIR's log importance weight, Xie et al. 2023,
  per n-gram), standardized by its mean and standard deviation over the corpus.

The bag has unit norm and the reference feature unit variance, so under the
ridge penalty (the same for every feature) the one feature weighs about as much
as the whole bag. Both distributions are fitted when the encoder is built and are
saved with every influence model that uses it (safetensors, no pickles), so a
saved model scores any text on its own.

Nothing here knows a domain or a label: the reference set is whatever target the
user gave the oracle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mates.dsir import DsirModel, feature_buckets
from mates.errors import ArtifactError

MODEL_TYPE = "mates-ngram"
NUM_BUCKETS = 16_384
_CONFIG = "config.json"
_WEIGHTS = "ngram.safetensors"


class NgramConfig:
    """What `InfluenceModel` and the FLOPs ledger read of an encoder's config."""

    model_type = MODEL_TYPE
    num_hidden_layers = 0

    def __init__(self, num_buckets: int):
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be at least 1, got {num_buckets}")
        self.num_buckets = int(num_buckets)
        self.hidden_size = self.num_buckets + 1  # the bag, then the reference feature

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "num_buckets": self.num_buckets}


class NgramTokenizer:
    """Texts to bucket ids, called like a Hugging Face tokenizer: `max_length` is in words."""

    def __init__(self, num_buckets: int):
        self.num_buckets = int(num_buckets)
        self.pad_token_id = self.num_buckets  # one past the last bucket: never counted

    def __call__(
        self, texts: Sequence[str], truncation: bool = True, max_length: int | None = None
    ) -> dict[str, list[list[int]]]:
        return {
            "input_ids": feature_buckets(
                list(texts), self.num_buckets, max_words=max_length if truncation else None
            )
        }

    def save_pretrained(self, path: Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)  # the encoder writes the config


class NgramEncoder(torch.nn.Module):
    """No trainable weights: fitted distributions only (buffers). `pool` gives the features."""

    bag_of_ngrams = True
    log_ratio: torch.Tensor  # buffers, registered in __init__
    ratio_stats: torch.Tensor

    def __init__(self, log_ratio: torch.Tensor, ratio_mean: float, ratio_std: float):
        super().__init__()
        self.config = NgramConfig(len(log_ratio))
        self.register_buffer("log_ratio", torch.as_tensor(log_ratio, dtype=torch.float32))
        self.register_buffer(
            "ratio_stats", torch.tensor([ratio_mean, ratio_std], dtype=torch.float32)
        )

    @classmethod
    def fit(
        cls,
        reference_texts: Sequence[str],
        corpus_texts: Sequence[str],
        num_buckets: int = NUM_BUCKETS,
        max_words: int | None = None,
    ) -> NgramEncoder:
        """p_ref on the reference texts, p_corpus on the corpus texts (whole texts, as DSIR
        counts them); the reference feature standardized over the corpus texts as the
        encoder reads them (their first `max_words` words)."""
        dsir = DsirModel.fit(reference_texts, corpus_texts, num_buckets)
        log_ratio = torch.as_tensor(dsir.log_p_ref - dsir.log_p_raw, dtype=torch.float32)
        lr = log_ratio.numpy()
        ratios = np.array(
            [
                lr[ids].mean() if ids else 0.0
                for ids in feature_buckets(list(corpus_texts), num_buckets, max_words)
            ]
        )
        std = float(ratios.std())
        return cls(log_ratio, float(ratios.mean()), std if std > 0 else 1.0)

    def _counts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(
            (input_ids.shape[0], self.config.num_buckets + 1),
            dtype=torch.float32,
            device=input_ids.device,
        )
        counts.scatter_add_(1, input_ids, attention_mask.to(torch.float32))
        return counts[:, : self.config.num_buckets]

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, num_buckets + 1) features in fp32 (see the module docstring)."""
        counts = self._counts(input_ids, attention_mask)
        bag = torch.log1p(counts)
        bag = bag / bag.norm(dim=1, keepdim=True).clamp(min=1e-12)
        ratio = (counts @ self.log_ratio) / attention_mask.sum(1).clamp(min=1)
        mean, std = self.ratio_stats
        return torch.cat([bag, ((ratio - mean) / std).unsqueeze(1)], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(input_ids, attention_mask)

    # -- persistence: the same directory layout as a Hugging Face model ------------

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / _CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2), encoding="utf-8")
        save_file(
            {
                "log_ratio": self.log_ratio.contiguous().cpu(),
                "ratio_stats": self.ratio_stats.contiguous().cpu(),
            },
            path / _WEIGHTS,
        )

    @classmethod
    def from_pretrained(cls, path: Path) -> NgramEncoder:
        path = Path(path)
        try:
            weights = load_file(path / _WEIGHTS)
            enc = cls(weights["log_ratio"], *weights["ratio_stats"].tolist())
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(
                f"n-gram encoder {path} is unreadable: {type(e).__name__}: {e}"
            ) from e
        num_buckets = json.loads((path / _CONFIG).read_text(encoding="utf-8")).get("num_buckets")
        if num_buckets != enc.config.num_buckets:
            raise ArtifactError(
                f"n-gram encoder {path}: config says {num_buckets} buckets, "
                f"its weights hold {enc.config.num_buckets}"
            )
        return enc


def is_ngram_dir(path: Path) -> bool:
    """Whether `path` holds a saved `NgramEncoder` (its config names the model type)."""
    cfg = Path(path) / _CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False
