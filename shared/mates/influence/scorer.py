"""`InfluenceScorer`: an influence model with its tokenizer, device and precision; it
tokenizes, batches by length, predicts, saves and loads."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mates.artifacts import atomic_path, read_json
from mates.errors import ArtifactError, DataError
from mates.influence.encoders import (
    _HEAD_CHARS_PER_TOKEN,
    Encoder,
    InfluenceModel,
    _Pooled,
    load_encoder,
    pooled_features,
)
from mates.lm import resolve_precision
from mates.ngram import NgramEncoder

log = logging.getLogger(__name__)


# Characters of a text's head tokenized per token of the limit: WordPiece averages ~4-5
# characters a token on English prose; a head that falls short is tokenized again whole.


@dataclass
class FitReport:
    """What `fit_influence_model` did and how well the fit predicts held-out probes.

    `val_spearman`, `val_pearson`: of the pooled out-of-fold predictions (the names
    predate cross-validation); None where undefined (constant predictions), as are
    `cv_low`, `cv_high`, the 95% interval of `val_spearman`. `nested`: whether the
    estimate is nested CV (ridge); otherwise the epoch count was picked on the same
    folds, which makes it slightly optimistic. `train_spearman`: the final model on
    all probes. `best_epoch`: the kept epoch count minus one ('sgd', 'encoder'), -1
    for 'ridge'; `epochs`: epochs each fold trained (0 for 'ridge'). `train_size`,
    `val_size` and `num_probes` are all the number of probes: the final model trains
    on every probe and every probe is predicted out of fold. `ridge_lambda`: the
    final head's penalty on the squared weights (None unless 'ridge').
    """

    val_spearman: float | None
    val_pearson: float | None
    train_spearman: float | None
    best_epoch: int
    epochs: int
    train_size: int
    val_size: int
    target_mean: float
    target_std: float
    seconds: float
    cv_folds: int
    cv_low: float | None
    cv_high: float | None
    fit: str  # 'ridge' | 'sgd' | 'encoder'
    ridge_lambda: float | None
    nested: bool
    num_probes: int


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length (no padding to a global maximum)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _tokens_stop_at_spaces(tokenizer) -> bool:
    """Whether the tokenizer splits words at spaces before anything else can join them.

    Then the ids of a text cut at a space are a prefix of the whole text's ids.
    Checked for BERT's WordPiece pipeline (MiniLM); any other keeps whole texts.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = type(getattr(backend, "pre_tokenizer", None)).__name__
    norm = type(getattr(backend, "normalizer", None)).__name__
    return pre == "BertPreTokenizer" and norm in ("BertNormalizer", "NoneType")


def _head(text: str, max_chars: int) -> str:
    """`text` cut at its last space within `max_chars`; whole if shorter or without one."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[:cut] if cut > 0 else text


def _collate(
    token_lists: list[list[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    return ids.to(device), mask.to(device)


class InfluenceScorer:
    """A fitted (or being fitted) influence model with its tokenizer and z-score constants.

    `precision` ('auto', 'fp32' or 'bf16') is the precision of `features` and
    `predict`, and may be changed on the instance; 'auto' resolves per device
    (`resolve_precision`).
    """

    def __init__(
        self,
        model: InfluenceModel,
        tokenizer,
        max_tokens: int,
        device: torch.device,
        meta: dict | None = None,
        precision: str = "auto",
        compile: bool = False,
    ):
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.device = device
        self.meta = meta or {}
        resolve_precision(precision, device)  # refuse a bad name now, not at the first batch
        self.precision = precision
        self.compile = compile
        self._bf16_encoder: tuple[tuple, Encoder] | None = None
        self._compiled: tuple[tuple, Callable] | None = None

    def _weights_key(self) -> tuple:
        """Changes whenever a parameter of the encoder is replaced or changed in place."""
        return tuple((id(p), p._version) for p in self.model.encoder.parameters())

    def _inference_encoder(self, precision: str) -> Encoder:
        """The encoder `features` runs: in bf16, a bf16 copy of the weights.

        Autocast casts every weight on every call; a copy cast once runs about 15%
        faster on a CPU. The copy is rebuilt whenever a parameter of the encoder has
        been replaced or changed in place (its tensor `_version`), so fitting the
        encoder never leaves it stale.
        """
        if precision != "bf16" or isinstance(self.model.encoder, NgramEncoder):
            return self.model.encoder
        key = self._weights_key()
        if self._bf16_encoder is None or self._bf16_encoder[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                enc = copy.deepcopy(self.model.encoder)
                torch.nn.Module.to(
                    enc, torch.bfloat16
                )  # PreTrainedModel.to's wrapper hides its signature
                enc.eval()
            enc.requires_grad_(False)
            self._bf16_encoder = (key, enc)
        return self._bf16_encoder[1]

    def _features_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """What `features` runs per batch: eager, or compiled when `compile` is set.

        Compiled with inductor's freezing (weights folded in as constants, fused
        elementwise kernels; on a CPU about 1.2x the eager bf16 path) and dynamic
        shapes, so new batch sizes and lengths do not recompile. The first call
        compiles (seconds to tens of seconds); a change to the weights compiles again.
        """
        precision = self.resolved_precision()
        encoder = self._inference_encoder(precision)
        if not self.compile or isinstance(
            encoder, NgramEncoder
        ):  # a bag of n-grams has nothing to fuse
            return lambda ids, mask: pooled_features(encoder, ids, mask)
        key = (self._weights_key(), precision)
        if self._compiled is None or self._compiled[0] != key:
            self._compiled = (
                key,
                torch.compile(_Pooled(encoder).eval(), dynamic=True, options={"freezing": True}),
            )
        compiled = self._compiled[1]

        def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            for t in (ids, mask):  # batch size and length symbolic from the first call on
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
            return compiled(ids, mask)

        return run

    def resolved_precision(self) -> str:
        """The precision `precision` resolves to on this scorer's device: 'fp32' or 'bf16'."""
        return resolve_precision(self.precision, self.device)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text's first `max_tokens` tokens (specials included).

        Where no token can span a space, a long text is tokenized from its head,
        cut at a space, and again whole only if the head falls short of the limit:
        the same ids, without tokenizing characters the model never reads.
        """
        texts = list(texts)
        heads = texts
        if _tokens_stop_at_spaces(self.tokenizer):
            heads = [_head(t, self.max_tokens * _HEAD_CHARS_PER_TOKEN) for t in texts]
        ids = self._encode(heads)
        short = [
            i
            for i, (t, h) in enumerate(zip(texts, heads, strict=True))
            if len(h) < len(t) and len(ids[i]) < self.max_tokens
        ]
        for i, whole in zip(short, self._encode([texts[i] for i in short]), strict=True):
            ids[i] = whole
        return ids

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []  # a fast tokenizer fails on an empty batch
        return self.tokenizer(texts, truncation=True, max_length=self.max_tokens)["input_ids"]

    @torch.inference_mode()
    def features(
        self,
        token_lists: list[list[int]],
        batch_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Pooled encoder features (N, C) in input order, length-bucketed batches."""
        self.model.eval()
        fn = self._features_fn()
        out = torch.empty((len(token_lists), self.model.encoder.config.hidden_size))
        for idx in length_batches([len(t) for t in token_lists], batch_size):
            ids, mask = _collate(
                [token_lists[i] for i in idx], self.tokenizer.pad_token_id, self.device
            )
            out[torch.from_numpy(idx)] = fn(ids, mask).cpu()
            if progress:
                progress(len(idx))
        return out

    @torch.inference_mode()
    def predict(
        self,
        token_lists: list[list[int]],
        batch_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        feats = self.features(token_lists, batch_size, progress)
        return self.predict_features(feats)

    @torch.inference_mode()
    def predict_features(self, feats: torch.Tensor) -> np.ndarray:
        self.model.head.eval()
        return self.model.head(feats.to(self.device)).squeeze(-1).float().cpu().numpy()

    def score_texts(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.predict(self.tokenize(texts), batch_size)

    # -- persistence -------------------------------------------------------

    def save(self, path: Path, encoder_source: str, train_encoder: bool) -> None:
        """Write the model dir atomically; a frozen pretrained encoder is referenced, not copied."""
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file(
                {k: v.contiguous() for k, v in self.model.head.state_dict().items()},
                tmp / "head.safetensors",
            )
            # copied: fine-tuned or random weights, and a bag of n-grams fitted on the run's data
            copy_encoder = train_encoder or encoder_source in ("tiny", "ngram")
            if copy_encoder:
                self.model.encoder.save_pretrained(tmp / "encoder")
                self.tokenizer.save_pretrained(tmp / "encoder")
            meta = {
                **self.meta,
                "max_tokens": self.max_tokens,
                "precision": self.precision,
                "encoder": "encoder" if copy_encoder else encoder_source,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def load(
        cls, path: Path, device: torch.device, precision: str | None = None, compile: bool = False
    ) -> InfluenceScorer:
        """A saved model; `precision` defaults to the one it was fitted and scored with."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise ArtifactError(f"{path} is not an influence model directory (no meta.json)")
        meta = read_json(path / "meta.json")
        source = meta["encoder"]
        encoder, tok = load_encoder(str(path / "encoder") if source == "encoder" else source)
        model = InfluenceModel(encoder)
        try:
            model.head.load_state_dict(load_file(path / "head.safetensors"))
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(
                f"influence model {path} is unreadable: {type(e).__name__}: {e}"
            ) from e
        return cls(
            model,
            tok,
            int(meta["max_tokens"]),
            device,
            meta,
            precision or meta.get("precision", "auto"),
            compile=compile,
        )


# -- the scoring paths a throughput benchmark compares -------------------------


def fast_predict(scorer: InfluenceScorer, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Scores in input order: tokenize everything first, then `scorer.predict`.

    Tokenizing the whole set in one call keeps it off the model loop (the fast
    tokenizer works on the whole list at once) and gives `predict` the lengths it
    sorts by.
    """
    return scorer.predict(scorer.tokenize(texts), batch_size)


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 90/10 split fits used before cross-validation; kept because older fit reports
    (no `val_size`) are read as this split sized them (`mates.report.views._val_n`)."""
    n_val = max(2, int(round(n * val_fraction)))
    if n - n_val < 2:
        raise DataError(f"need at least {n_val + 2} probes to fit the influence model, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], perm[:n_val]
