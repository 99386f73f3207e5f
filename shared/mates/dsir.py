"""DSIR: data selection by importance resampling on hashed n-gram features.

Baseline from Xie, Santurkar, Ma and Liang (2023), "Data Selection for Language
Models via Importance Resampling" (NeurIPS 2023, arXiv:2302.03169).

What is computed. Each document ``x`` is mapped to a bag of hashed features: its
words are ``re.findall(r"\\w+", x.lower())``; the features are every unigram and
every adjacent-word bigram, each hashed into one of ``num_buckets`` buckets
(10,000 by default, as in the paper). Two multinomials over the buckets are
fitted by counting, with additive (Laplace) smoothing: ``p_ref`` on the reference
(target) texts and ``p_raw`` on the raw pool. A document's log importance weight
is the log-likelihood ratio of its feature counts under the two bag-of-n-grams
models::

    log w(x) = sum_b count_b(x) * (log p_ref[b] - log p_raw[b])

DSIR then samples ``k`` documents without replacement with probability
proportional to ``w(x)``, which is Gumbel-top-k on ``log w(x)``.

The hash is stable across processes and machines (never Python's salted
``hash``): a word hashes to the first 8 bytes of BLAKE2b of its UTF-8 encoding,
read little-endian; a bigram hashes to a fixed 64-bit mix (SplitMix64's
finalizer) of its two word hashes, which is order-sensitive ("a b" and "b a"
land in different buckets). A feature's bucket is its hash modulo
``num_buckets``. :func:`feature_bucket` gives the bucket of one feature.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from mates.errors import DataError

__all__ = [
    "NUM_BUCKETS",
    "DsirModel",
    "dsir_scores",
    "feature_bucket",
    "feature_buckets",
    "ngram_counts",
    "tokenize",
]

NUM_BUCKETS = 10_000

_WORD = re.compile(r"\w+")

# Constants of the bigram mix (golden-ratio increment and SplitMix64's finalizer).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def tokenize(text: str) -> list[str]:
    """The words of ``text``: runs of word characters, lower-cased."""
    return _WORD.findall(text.lower())


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _bigram_hash(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Stable, order-sensitive 64-bit hash of word pairs from their word hashes (uint64)."""
    with np.errstate(over="ignore"):
        z = first * _GOLDEN + second  # wraps modulo 2**64
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _check_buckets(num_buckets: int) -> int:
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)):
        raise ValueError(f"num_buckets must be an integer, got {num_buckets!r}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be at least 1, got {num_buckets}")
    return int(num_buckets)


def feature_bucket(feature: str, num_buckets: int = NUM_BUCKETS) -> int:
    """Bucket of one feature: a single word ("goal") or a bigram of two words ("the goal")."""
    num_buckets = _check_buckets(num_buckets)
    words = feature.split(" ")
    if len(words) == 1:
        return _word_hash(words[0]) % num_buckets
    if len(words) == 2:
        h = _bigram_hash(
            np.array([_word_hash(words[0])], dtype=np.uint64),
            np.array([_word_hash(words[1])], dtype=np.uint64),
        )
        return int(h[0] % np.uint64(num_buckets))
    raise ValueError(f"a feature is one word or two words separated by a space, got {feature!r}")


def _hashed(
    texts: Sequence[str], max_words: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(buckets-to-be, doc of each feature, per-text feature count): the 64-bit hashes of
    every text's unigrams (its first `max_words` words, all if None), then of its bigrams."""
    if isinstance(texts, str):
        raise TypeError(
            "ngram_counts and feature_buckets take a sequence of texts, not a single string"
        )
    vocab: dict[str, int] = {}
    ids: list[int] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        words = tokenize(text)
        if max_words is not None:
            words = words[:max_words]
        lengths[i] = len(words)
        for w in words:
            j = vocab.get(w)
            if j is None:
                j = vocab[w] = len(vocab)
            ids.append(j)

    word_hashes = np.fromiter((_word_hash(w) for w in vocab), dtype=np.uint64, count=len(vocab))
    hashes = word_hashes[np.asarray(ids, dtype=np.int64)]
    doc_of_word = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)

    # Bigram (t, t+1) is kept when both words belong to the same text.
    same_doc = doc_of_word[:-1] == doc_of_word[1:]
    bigram_hashes = _bigram_hash(hashes[:-1][same_doc], hashes[1:][same_doc])
    return (
        np.concatenate([hashes, bigram_hashes]),
        np.concatenate([doc_of_word, doc_of_word[:-1][same_doc]]),
        2 * lengths - (lengths > 0),
    )


def ngram_counts(texts: Sequence[str], num_buckets: int = NUM_BUCKETS) -> scipy.sparse.csr_matrix:
    """Hashed unigram + bigram counts: a ``(len(texts), num_buckets)`` CSR matrix (float64).

    A text of ``n`` words contributes ``n`` unigram and ``n - 1`` bigram counts (none
    if it has no words). Bigrams never span two texts.
    """
    num_buckets = _check_buckets(num_buckets)
    hashes, rows, _ = _hashed(texts, None)
    buckets = hashes % np.uint64(num_buckets)
    data = np.ones(len(rows), dtype=np.float64)
    counts = scipy.sparse.csr_matrix(
        (data, (rows, buckets.astype(np.int64))), shape=(len(texts), num_buckets)
    )
    counts.sum_duplicates()
    return counts


def feature_buckets(
    texts: Sequence[str], num_buckets: int = NUM_BUCKETS, max_words: int | None = None
) -> list[list[int]]:
    """Each text's features as bucket ids, as :func:`ngram_counts` counts them: the
    unigrams of its first ``max_words`` words (all if None), then their bigrams."""
    num_buckets = _check_buckets(num_buckets)
    hashes, rows, per_text = _hashed(texts, max_words)
    if len(per_text) == 0:
        return []
    buckets = (hashes % np.uint64(num_buckets)).astype(np.int64)
    order = np.argsort(rows, kind="stable")  # unigrams before bigrams within a text
    return [part.tolist() for part in np.split(buckets[order], np.cumsum(per_text)[:-1])]


def _log_multinomial(counts: np.ndarray, smoothing: float) -> np.ndarray:
    smoothed = counts + smoothing
    return np.log(smoothed) - np.log(smoothed.sum())


def _bucket_totals(counts: scipy.sparse.csr_matrix) -> np.ndarray:
    return np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()


def _counts_of(texts: Sequence[str], name: str, num_buckets: int) -> scipy.sparse.csr_matrix:
    """Counts of a fitting set; DataError when it is empty or has no words at all."""
    if len(texts) == 0:
        raise DataError(f"DSIR needs {name} texts, got an empty list")
    counts = ngram_counts(texts, num_buckets)
    if counts.nnz == 0:
        raise DataError(
            f"DSIR {name} texts contain no words ({len(texts)} texts, all empty "
            "or without word characters)"
        )
    return counts


@dataclass
class DsirModel:
    """The two bag-of-hashed-n-grams models: log probabilities over the buckets."""

    log_p_ref: np.ndarray
    log_p_raw: np.ndarray

    def __post_init__(self) -> None:
        self.log_p_ref = np.asarray(self.log_p_ref, dtype=np.float64)
        self.log_p_raw = np.asarray(self.log_p_raw, dtype=np.float64)
        if self.log_p_ref.ndim != 1 or self.log_p_ref.shape != self.log_p_raw.shape:
            raise ValueError(
                "log_p_ref and log_p_raw must be 1-D and of equal length, got shapes "
                f"{self.log_p_ref.shape} and {self.log_p_raw.shape}"
            )
        if len(self.log_p_ref) == 0:
            raise ValueError("a DSIR model needs at least one bucket")

    @property
    def num_buckets(self) -> int:
        return len(self.log_p_ref)

    @classmethod
    def fit(
        cls,
        reference_texts: Sequence[str],
        raw_texts: Sequence[str],
        num_buckets: int = NUM_BUCKETS,
        smoothing: float = 1.0,
    ) -> DsirModel:
        """Fit ``p_ref`` on the reference texts and ``p_raw`` on the raw pool.

        Each is the multinomial over buckets of the summed hashed n-gram counts, with
        ``smoothing`` added to every bucket, so buckets unseen in one set keep a finite
        log probability.
        """
        num_buckets = _check_buckets(num_buckets)
        return cls._from_counts(
            _counts_of(reference_texts, "reference", num_buckets),
            _counts_of(raw_texts, "raw (pool)", num_buckets),
            smoothing,
        )

    @classmethod
    def _from_counts(
        cls,
        reference_counts: scipy.sparse.csr_matrix,
        raw_counts: scipy.sparse.csr_matrix,
        smoothing: float,
    ) -> DsirModel:
        if not np.isfinite(smoothing) or smoothing <= 0:
            raise ValueError(f"smoothing must be a positive number, got {smoothing!r}")
        return cls(
            log_p_ref=_log_multinomial(_bucket_totals(reference_counts), smoothing),
            log_p_raw=_log_multinomial(_bucket_totals(raw_counts), smoothing),
        )

    def log_importance(self, texts: Sequence[str]) -> np.ndarray:
        """Log importance weight of each text: sum_b count_b(x) (log p_ref[b] - log p_raw[b]).

        Float64, one per text; a text without words gets 0.0.
        """
        counts = ngram_counts(texts, self.num_buckets)
        return np.asarray(counts @ (self.log_p_ref - self.log_p_raw), dtype=np.float64)


def dsir_scores(
    reference_texts: Sequence[str], pool_texts: Sequence[str], num_buckets: int = NUM_BUCKETS
) -> np.ndarray:
    """DSIR scores of the pool: ``-log w(x)``, lower is more helpful.

    Fits :class:`DsirModel` on (reference, pool) and returns the negated log
    importance weight of each pool text, following the project's convention that a
    lower score is a more helpful document. Selection keeps documents by Gumbel-top-k
    on ``softmax(-score / tau)``; with ``tau = 1`` that is ``softmax(log w)``, i.e.
    exactly DSIR's resampling proportional to the importance weight, without
    replacement.
    """
    num_buckets = _check_buckets(num_buckets)
    # Same as -DsirModel.fit(reference, pool).log_importance(pool), counting the pool once.
    reference_counts = _counts_of(reference_texts, "reference", num_buckets)
    pool_counts = _counts_of(pool_texts, "raw (pool)", num_buckets)
    model = DsirModel._from_counts(reference_counts, pool_counts, smoothing=1.0)
    return -np.asarray(pool_counts @ (model.log_p_ref - model.log_p_raw), dtype=np.float64)
