"""Scoring stage k+1's pool with stage k's influence model, one shard at a time (here, or
through a `score_texts` callable such as the HTTP scorer), and merging the shards."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mates.artifacts import read_json, read_jsonl, write_jsonl
from mates.context import Context
from mates.errors import ArtifactError
from mates.influence import InfluenceScorer
from mates.stages.fitting import ModelSlot

# Frozen-encoder features by (encoder weights, length, precision), then by document text.
_FEATURES: dict[tuple, dict[bytes, torch.Tensor]] = {}


def num_shards(ctx: Context, k: int) -> int:
    """Scoring shards of stage k+1's pool."""
    n = len(read_json(ctx.paths.pool(k + 1))["ids"])
    return -(-n // ctx.cfg.influence.score_shard_docs)


def shard_ids(ctx: Context, k: int, shard: int) -> list[str]:
    per = ctx.cfg.influence.score_shard_docs
    ids = read_json(ctx.paths.pool(k + 1))["ids"][shard * per : (shard + 1) * per]
    if not ids:
        raise ArtifactError(
            f"stage {k}: shard {shard} is out of range ({num_shards(ctx, k)} shards)"
        )
    return ids


def score_shard(
    ctx: Context,
    slot: ModelSlot,
    k: int,
    shard: int,
    score_texts: Callable[[list[str], list[str]], Sequence[float]] | None = None,
) -> Path:
    """Score one shard of stage k+1's pool with stage k's influence model.

    `score_texts(ids, texts)` scores elsewhere (the HTTP scorer); by default the model
    is loaded here. Returns the shard's file.
    """
    out = ctx.paths.score_shard(k, shard)
    if out.is_file():
        return out
    ids = shard_ids(ctx, k, shard)
    if score_texts is not None:
        texts = [ctx.corpus.text(ctx.corpus.index_of(d)) for d in ids]
        scores = [float(x) for x in score_texts(ids, texts)]
        if len(scores) != len(ids):
            raise ArtifactError(
                f"stage {k} shard {shard}: {len(scores)} scores for {len(ids)} documents"
            )
    else:
        scores = score_locally(ctx, slot.get(ctx, k), ids).tolist()
    write_jsonl(out, ({"id": d, "score": s} for d, s in zip(ids, scores, strict=True)))
    return out


def score_locally(ctx: Context, scorer: InfluenceScorer, ids: list[str]) -> np.ndarray:
    idx = ctx.corpus.indices_of(ids)
    ic = ctx.cfg.influence
    bs = ic.batch_size * 4
    # fine-tuned: features change per stage; a bag of n-grams: cheaper to compute than to keep
    if ic.train_encoder or ic.encoder == "ngram":
        return scorer.predict(scorer.tokenize([ctx.corpus.text(int(i)) for i in idx]), bs)
    return scorer.predict_features(frozen_features(ctx, scorer, idx, bs, None))


def merge(ctx: Context, k: int) -> None:
    """Join the shard files into `scores(k)`, in pool order; every shard must exist."""
    rows: list[dict] = []
    for shard in range(num_shards(ctx, k)):
        path = ctx.paths.score_shard(k, shard)
        if not path.is_file():
            raise ArtifactError(f"stage {k}: score shard {shard} is missing ({path})")
        rows.extend(read_jsonl(path))
    write_jsonl(ctx.paths.scores(k), rows)
    vals = np.array([r["score"] for r in rows])
    ctx.manifest.update_metrics(
        k, scores={"count": len(rows), "mean": float(vals.mean()), "std": float(vals.std())}
    )


def frozen_features(
    ctx: Context, scorer: InfluenceScorer, idx: np.ndarray, bs: int, progress
) -> torch.Tensor:
    """A frozen encoder's features never change: compute each document's once per process,
    shared by every run in it that uses the same encoder weights (the arms of a comparison)."""
    cache = _FEATURES.setdefault(_encoder_key(scorer), {})
    keys = {int(i): _text_key(ctx.corpus.text(int(i))) for i in idx}
    todo = [i for i, key in keys.items() if key not in cache]
    if todo:
        feats = scorer.features(scorer.tokenize([ctx.corpus.text(i) for i in todo]), bs, progress)
        cache.update(zip((keys[i] for i in todo), feats, strict=True))
    return torch.stack([cache[keys[int(i)]] for i in idx])


def _encoder_key(scorer: InfluenceScorer) -> tuple:
    """Tells encoders apart by their weights (a checksum), so two runs share features only
    when their encoders would compute the same ones."""
    with torch.no_grad():
        enc = scorer.model.encoder
        total = sum(
            float(p.double().sum()) for p in itertools.chain(enc.parameters(), enc.buffers())
        )
    return (round(total, 6), scorer.max_tokens, scorer.resolved_precision())


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
