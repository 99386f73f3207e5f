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

One module each: `encoders`, `scorer`, `crossval`, `fitting`; this package re-exports them.
"""

from mates.influence.crossval import (
    CONFIDENCE,
    RIDGE_ALPHAS,
    RidgeCV,
    _best,
    cv_folds_of,
    min_probes,
    ridge_cv,
    spearman_interval,
)
from mates.influence.encoders import (
    MINILM_PACKAGE,
    Encoder,
    InfluenceModel,
    load_encoder,
    minilm_dir,
    pooled_features,
)
from mates.influence.fitting import _head_trainer, fit_influence_model, report_dict
from mates.influence.scorer import FitReport, InfluenceScorer, _split, fast_predict, length_batches
from mates.lm import PRECISIONS, autocast, cpu_has_native_bf16, resolve_precision

__all__ = [
    "CONFIDENCE",
    "Encoder",
    "FitReport",
    "InfluenceModel",
    "InfluenceScorer",
    "MINILM_PACKAGE",
    "PRECISIONS",
    "RIDGE_ALPHAS",
    "RidgeCV",
    "_best",
    "_head_trainer",
    "_split",
    "autocast",
    "cpu_has_native_bf16",
    "cv_folds_of",
    "fast_predict",
    "fit_influence_model",
    "length_batches",
    "load_encoder",
    "min_probes",
    "minilm_dir",
    "pooled_features",
    "report_dict",
    "resolve_precision",
    "ridge_cv",
    "spearman_interval",
]
