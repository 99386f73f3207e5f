"""Small statistics used across the library.

The correlation formulas (rankdata, pearson, spearman) are plain numpy. The comparison helpers
below (t_interval, bootstrap_paired_difference, tokens_to_match, censored_summary) are what a
multi-seed comparison of data-selection arms reports; only the Student-t quantile comes from
SciPy, imported where it is used so that importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or shorter than 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    return pearson(rankdata(a), rankdata(b))


# --- multi-seed comparison of arms ------------------------------------------------------------

# Bootstrap replicates are computed in chunks of at most this many (replicate, document) weights,
# so that memory stays bounded (~64 MiB of float64) however many documents are scored.
_BOOT_CHUNK_ELEMENTS = 8_000_000


def _round_or_none(x: float) -> float | None:
    """JSON-friendly number: NaN has no JSON spelling, so it becomes None."""
    return None if math.isnan(x) else round(float(x), 6)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval and the sample size it rests on."""

    estimate: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        """Rounded for reports; NaN becomes None because JSON cannot hold it."""
        return {
            "estimate": _round_or_none(self.estimate),
            "low": _round_or_none(self.low),
            "high": _round_or_none(self.high),
            "n": int(self.n),
        }


def _check_confidence(confidence: float) -> None:
    """A confidence outside (0, 1) would silently produce a meaningless or inverted interval."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def t_interval(values: ArrayLike, confidence: float = 0.95) -> Interval:
    """Mean with a two-sided Student-t interval: mean ± t_{(1+c)/2, n-1} · sd / √n (sd ddof=1).

    Used for per-seed results, where n is a handful of seeds: the t quantile (not the normal
    one) is what keeps the interval honest at n = 3. NaN is rejected rather than propagated,
    because a silently NaN interval in a report reads like "no difference".
    """
    from scipy.stats import t as student_t  # deferred: scipy is slow to import

    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(x.size)
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {n}")
    if np.isnan(x).any():
        raise ValueError("a t-interval cannot be computed from NaN values")
    mean = float(x.mean())
    quantile = float(student_t.ppf((1.0 + confidence) / 2.0, n - 1))
    half = quantile * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(estimate=mean, low=mean - half, high=mean + half, n=n)


def _paired_inputs(
    sums_a: ArrayLike, sums_b: ArrayLike, counts: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and return (sums_a, sums_b, counts) as float arrays, counts shaped (S, D) or (D,)."""
    a = np.asarray(sums_a, dtype=np.float64)
    b = np.asarray(sums_b, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(
            f"sums_a must have shape (seeds, documents), got shape {a.shape}"
            " (use shape (1, D) for a single seed)"
        )
    if b.shape != a.shape:
        raise ValueError(f"sums_b has shape {b.shape} but sums_a has shape {a.shape}")
    n_seeds, n_docs = a.shape
    if n_seeds < 1 or n_docs < 1:
        raise ValueError(f"need at least one seed and one document, got shape {a.shape}")
    if c.shape not in ((n_docs,), a.shape):
        raise ValueError(
            f"counts must have shape ({n_docs},) or {a.shape} to match the sums, got {c.shape}"
        )
    for name, arr in (("sums_a", a), ("sums_b", b), ("counts", c)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    if (c.sum(axis=-1) <= 0).any():
        raise ValueError("counts must sum to a positive number of tokens (in every seed)")
    return a, b, c


def _seed_mean_difference(
    weights: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray
) -> np.ndarray:
    """Seed-mean of (metric_A - metric_B) under document weights of shape (R, D); returns (R,).

    A weight is how often a document is drawn, so sum_d w_d * x_d is the total over a resampled
    corpus; counts are shared by the arms, so the same denominator serves both.
    """
    tokens = weights @ c.T if c.ndim == 2 else (weights @ c)[:, None]  # (R, S) or (R, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = (weights @ a.T - weights @ b.T) / tokens  # (R, S)
    return diff.mean(axis=1)


def bootstrap_paired_difference(
    sums_a: ArrayLike,
    sums_b: ArrayLike,
    counts: ArrayLike,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Seed-mean difference of corpus-level per-token loss, arm A minus arm B, with a
    percentile bootstrap interval over held-out documents.

    sums_a, sums_b: summed token loss per (seed, document), shape (S, D); counts: scored tokens
    per document, shape (D,) or (S, D), shared by both arms. In each seed an arm's metric is
    sum_d sums / sum_d counts (a token-weighted mean, as a plain eval loss is), and the estimate
    is the mean over seeds of metric_A - metric_B.

    The bootstrap redraws D documents with replacement and uses the same draw for every seed and
    both arms: the arms are compared on identical documents, so document difficulty cancels and
    only the arm-by-document interaction is left to vary (pairing is what makes this tight). The
    interval therefore covers document-sampling uncertainty given these trained seeds; it does
    not account for a training seed shifting a whole arm (compare per-seed metrics with
    t_interval for that). n is D.

    A draw of D multinomial weights is the same as drawing D indices with replacement, and it
    turns each replicate into two matrix products, computed in bounded-memory chunks.
    """
    _check_confidence(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    a, b, c = _paired_inputs(sums_a, sums_b, counts)
    n_docs = a.shape[1]
    estimate = float(_seed_mean_difference(np.ones((1, n_docs)), a, b, c)[0])

    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // n_docs)
    uniform = np.full(n_docs, 1.0 / n_docs)
    replicates = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        weights = rng.multinomial(n_docs, uniform, size=size).astype(np.float64)
        replicates[start : start + size] = _seed_mean_difference(weights, a, b, c)
    # A replicate can only be NaN when every drawn document has zero scored tokens; such a
    # resampled corpus has no metric, so it is left out rather than poisoning the quantiles.
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(replicates, [alpha, 1.0 - alpha])
    return Interval(estimate=estimate, low=float(low), high=float(high), n=n_docs)


def tokens_to_match(
    points: Sequence[tuple[float, float]], target: float, start_tokens: float | None = None
) -> float | None:
    """First token count at which the loss curve reaches (<=) target; None when it never does.

    points: (tokens, loss) evaluation points sorted by tokens. Between consecutive points the
    crossing is linearly interpolated. Only points with tokens >= start_tokens are searched,
    and no interpolation reaches back before start_tokens: a staged run shares its first stage
    across arms, so a crossing inside it says nothing about the selection that followed; if the
    first searched point already meets the target its token count is returned. None means
    censored (the run ended above target), which censored_summary treats as +infinity.
    """
    pts = [(float(t), float(loss)) for t, loss in points]
    if any(math.isnan(t) or math.isnan(loss) for t, loss in pts):
        raise ValueError("points must not contain NaN")
    if any(t1 < t0 for (t0, _), (t1, _) in zip(pts, pts[1:], strict=False)):
        raise ValueError("points must be sorted by tokens")
    if start_tokens is not None:
        pts = [(t, loss) for t, loss in pts if t >= start_tokens]
    previous: tuple[float, float] | None = None
    for tokens, loss in pts:
        if loss <= target:
            if previous is None:
                return tokens
            t0, l0 = previous
            if math.isinf(l0):  # the curve comes down from infinity: no slope to interpolate
                return tokens
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        previous = (tokens, loss)
    return None


def censored_summary(values: Sequence[float | None]) -> dict:
    """Median/min/max of per-seed results where None means censored (never reached, +infinity).

    Only order statistics survive censoring: the median is reported when it falls on an observed
    value (for even n both middle values must be observed), min when anything was observed, and
    max only when nothing was censored, since a censored value is unbounded above.
    """
    if any(v is not None and math.isnan(v) for v in values):
        raise ValueError("values must be numbers or None (censored), not NaN")
    n = len(values)
    censored = sum(v is None for v in values)
    x = np.sort(np.array([math.inf if v is None else float(v) for v in values], dtype=np.float64))

    def finite(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    if n == 0:
        median = None
    elif n % 2:
        median = finite(x[n // 2])
    else:
        lo, hi = x[n // 2 - 1], x[n // 2]
        median = float((lo + hi) / 2.0) if math.isfinite(hi) else None
    return {
        "median": median,
        "min": finite(x[0]) if n else None,
        "max": finite(x[-1]) if n and censored == 0 else None,
        "censored": censored,
        "n": n,
    }
