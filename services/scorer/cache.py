"""A small LRU cache of loaded influence models, keyed by version."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mates.influence import InfluenceScorer
from services.scorer.registry import Version

log = logging.getLogger(__name__)

Loader = Callable[[Path, torch.device], InfluenceScorer]


class LoadedModel:
    """One loaded version; its tokenizer is used by one thread at a time.

    (A fast tokenizer called concurrently with `truncation=True` can fail with
    "Already borrowed", because each call sets the truncation state in Rust.)
    """

    def __init__(self, version: Version, scorer: InfluenceScorer):
        self.version = version
        self.scorer = scorer
        self._tokenize_lock = threading.Lock()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        with self._tokenize_lock:
            return self.scorer.tokenize(texts)


class ModelCache:
    """Holds at most `capacity` versions; a version is loaded once even when asked for at once."""

    def __init__(self, capacity: int, device: torch.device, loader: Loader = InfluenceScorer.load):
        if capacity < 1:
            raise ValueError(f"model cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.device = device
        self.loads = 0  # how many times a model was read from disk
        self.hits = 0  # requests served by a model already loaded
        self._loader = loader
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _cached(self, name: str) -> LoadedModel | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries.move_to_end(name)
            return entry

    def get(self, version: Version) -> LoadedModel:
        entry = self._cached(version.name)
        if entry is not None:
            with self._lock:
                self.hits += 1
            return entry
        with self._lock:
            loading = self._loading.setdefault(version.name, threading.Lock())
        with loading:
            entry = self._cached(version.name)
            if entry is not None:
                return entry
            try:
                entry = self._load(version)
            finally:
                with self._lock:
                    self._loading.pop(version.name, None)
        return entry

    def _load(self, version: Version) -> LoadedModel:
        t0 = time.perf_counter()
        entry = LoadedModel(version, self._loader(version.path, self.device))
        with self._lock:
            self.loads += 1
            self._entries[version.name] = entry
            while len(self._entries) > self.capacity:
                evicted, _ = self._entries.popitem(last=False)
                log.info("evicted model %s from the cache", evicted)
        log.info(
            "loaded model %s on %s in %.2fs", version.name, self.device, time.perf_counter() - t0
        )
        return entry

    def versions(self) -> list[str]:
        """Cached versions, least recently used first."""
        with self._lock:
            return list(self._entries)
