"""Choosing the next stage's data from scored candidates.

Gumbel-top-k draws k items WITHOUT replacement with probability proportional to
softmax(−score/τ) at each draw: keep the k largest of `−score/τ + G`,
G ~ Gumbel(0, 1) i.i.d. (Kool et al., 2019). The reference code adds the noise to
`score/τ` and keeps the smallest, which is a different distribution; we don't.
Scores are joined to documents by ID, never by row position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from mates.errors import ConfigError, DataError

METHODS = ("gumbel", "topk", "random")


Seed = int | Sequence[int]
"""What seeds a selection's generator (`numpy.random.default_rng`): an int, or a sequence
such as [run seed, stage, purpose]."""


def num_selected(pool_size: int, ratio: float) -> int:
    """k = round(ratio × pool), at least one document."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"`selection.ratio` must be in (0, 1], got {ratio}")
    if pool_size <= 0:
        raise DataError("cannot select from an empty pool")
    return max(1, min(pool_size, int(round(ratio * pool_size))))


def gumbel_top_k(
    scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator
) -> np.ndarray:
    """Indices of k draws without replacement from softmax(−scores/τ), in draw order."""
    if not temperature > 0:  # NaN too
        raise ConfigError(f"`selection.temperature` must be > 0, got {temperature}")
    keys = -np.asarray(scores, dtype=np.float64) / temperature + rng.gumbel(size=len(scores))
    top = np.argpartition(-keys, k - 1)[:k] if k < len(keys) else np.arange(len(keys))
    return top[np.argsort(-keys[top], kind="stable")]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The k lowest (most helpful) scores; ties broken by position for determinism."""
    return np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def select_indices(
    scores: np.ndarray | None,
    pool_size: int,
    *,
    ratio: float,
    method: str,
    temperature: float,
    seed: Seed,
) -> np.ndarray:
    """Indices into the pool chosen by `method`; `scores` may be None for 'random'."""
    k = num_selected(pool_size, ratio)
    rng = np.random.default_rng(seed)
    if method == "random":
        return rng.choice(pool_size, size=k, replace=False)
    return _by_score(scores, pool_size, k, method=method, temperature=temperature, rng=rng)


def selection_order(
    scores: np.ndarray | None, pool_size: int, *, method: str, temperature: float, seed: Seed
) -> np.ndarray:
    """Every pool index in the order `method` would keep them: a seeded permutation
    ('random'), the lowest scores first ('topk'), or Gumbel-top-k draw order ('gumbel').
    A token budget keeps the shortest prefix that fills it (`fill_budget`)."""
    if pool_size <= 0:
        raise DataError("cannot select from an empty pool")
    rng = np.random.default_rng(seed)
    if method == "random":
        return rng.permutation(pool_size)
    return _by_score(scores, pool_size, pool_size, method=method, temperature=temperature, rng=rng)


def _by_score(
    scores: np.ndarray | None,
    pool_size: int,
    k: int,
    *,
    method: str,
    temperature: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The first k pool indices that 'topk' or 'gumbel' keeps, after checking the scores."""
    if method not in METHODS:
        raise ConfigError(f"`selection.method` must be one of {METHODS}, got {method!r}")
    if scores is None or len(scores) != pool_size:
        raise DataError(f"method {method!r} needs one score per pool document")
    if not np.all(np.isfinite(scores)):
        raise DataError("scores contain NaN or infinite values")
    if method == "topk":
        return top_k(scores, k)
    return gumbel_top_k(scores, k, temperature, rng)


def fill_budget(order: np.ndarray, lengths: np.ndarray, need: int) -> tuple[np.ndarray, bool]:
    """The shortest prefix of `order` whose documents, each followed by an EOS, hold at least
    `need` tokens; all of `order` when they never do. Returns it and whether it filled."""
    total = np.cumsum(np.asarray(lengths, dtype=np.int64)[order] + 1)
    n = int(np.searchsorted(total, need)) + 1
    return order[: min(n, len(order))], bool(len(total) and total[-1] >= need)


def label_order(matching: np.ndarray, *, seed: Seed) -> np.ndarray:
    """The matching documents in random order, then the others in random order."""
    matching = np.asarray(matching, dtype=bool)
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.permutation(np.flatnonzero(matching)), rng.permutation(np.flatnonzero(~matching))]
    )


def label_matches(labels: Sequence[str | None], targets: Sequence[str]) -> np.ndarray:
    """Which labels are a target or sit below one ('news' matches 'news/sports')."""
    wanted = tuple(targets)
    below = tuple(t.rstrip("/") + "/" for t in wanted)
    return np.array(
        [lab is not None and (lab in wanted or lab.startswith(below)) for lab in labels], dtype=bool
    )


def target_label_mask(
    labels: Sequence[str | None], targets: Sequence[str], *, setting: str, field: str | None
) -> np.ndarray:
    """`label_matches`, refusing what cannot select anything: no targets (named by `setting`),
    no label column (`field`, i.e. `data.domain_field`), or targets that match no label."""
    if not targets:
        raise ConfigError(f"{setting} must name at least one label for method 'label'")
    if not field or not any(labels):
        raise ConfigError(
            "method 'label' needs a label column: set `data.domain_field` to a "
            f"corpus column that holds labels (now {field!r}, no values found)"
        )
    mask = label_matches(labels, targets)
    if not mask.any():
        found = sorted({lab for lab in labels if lab})[:10]
        raise ConfigError(
            f"{setting} {list(targets)} match no document's `{field}` (labels found: {found})"
        )
    return mask


def label_selection(matching: np.ndarray, *, ratio: float, seed: Seed) -> tuple[np.ndarray, int]:
    """k = ratio × pool documents, drawn at random among the matching ones; when fewer
    match, all of them plus random others (the stage's token budget is fixed either way).
    Returns the indices and how many were filled in at random."""
    matching = np.asarray(matching, dtype=bool)
    k = num_selected(len(matching), ratio)
    rng = np.random.default_rng(seed)
    hits = rng.permutation(np.flatnonzero(matching))
    if len(hits) >= k:
        return hits[:k], 0
    rest = rng.permutation(np.flatnonzero(~matching))[: k - len(hits)]
    return np.concatenate([hits, rest]), int(len(rest))


def join_scores(pool_ids: Sequence[str | None], rows: Iterable[dict]) -> np.ndarray:
    """Scores aligned to `pool_ids` by document ID; every ID exactly once, no strangers."""
    by_id: dict[str, float] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise DataError(f"score row must be a JSON object with `id` and `score`, got {row!r}")
        doc_id, score = row.get("id"), row.get("score")
        if not isinstance(doc_id, str):
            raise DataError(f"score row without a string `id`: {row!r}")
        if doc_id in by_id:
            raise DataError(f"duplicate score for id {doc_id!r}")
        if (
            not isinstance(score, (int, float))
            or isinstance(score, bool)
            or not math.isfinite(score)
        ):
            raise DataError(f"score for id {doc_id!r} is not a finite number: {score!r}")
        by_id[doc_id] = float(score)
    missing = [d for d in pool_ids if d not in by_id]
    if missing:
        raise DataError(f"{len(missing)} pool documents have no score, e.g. {missing[:3]}")
    extra = set(by_id) - set(pool_ids)
    if extra:
        raise DataError(
            f"{len(extra)} scores name documents outside the pool, e.g. {sorted(extra)[:3]}"
        )
    # every ID is a string by now: a None would have been reported missing
    return np.array([by_id[d] for d in pool_ids if d is not None], dtype=np.float64)


def select_ids(
    rows: list[dict], *, fraction: float, method: str, temperature: float, seed: int
) -> list[str]:
    """Select from scored rows {id, score} (the `mates select` command)."""
    ids = [r.get("id") if isinstance(r, dict) else None for r in rows]
    scores = join_scores(ids, rows)  # validates IDs and values
    chosen = select_indices(
        scores, len(ids), ratio=fraction, method=method, temperature=temperature, seed=seed
    )
    return [ids[i] for i in chosen]
