"""Dynamic batching: one model thread runs the documents of concurrent requests together.

Requests hand in token lists (tokenized on their own threads) and get a future.
The model thread takes the oldest job, then waits up to `wait_s` for more jobs
for the same model until `max_docs` documents are gathered, and scores them in
one `predict` call, which sorts them by length into forward passes of at most
`max_docs` documents (`mates.influence.length_batches`). Jobs for other models
wait, in order, for the next round.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from services.scorer.errors import ShuttingDown

log = logging.getLogger(__name__)


class Predictor(Protocol):
    def predict(self, token_lists: list[list[int]], batch_size: int) -> np.ndarray: ...


@dataclass
class _Job:
    model: Predictor
    token_lists: list[list[int]]
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, max_docs: int, wait_s: float, name: str = "scorer-model"):
        if max_docs < 1:
            raise ValueError(f"max_docs must be >= 1, got {max_docs}")
        self.max_docs = max_docs
        self.wait_s = max(0.0, wait_s)
        self.batches = 0  # predict calls made, for logs and tests
        self.on_batch: Callable[[int], None] | None = None  # documents per pass (metrics)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending: deque[_Job] = deque()  # jobs for another model; model thread only
        self._stopping = False  # model thread only: the stop sentinel was seen
        self._closed = False  # no more submissions; guarded by _submit_lock
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new jobs, finish the queued ones, end the model thread."""
        with self._submit_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def submit(self, model: Predictor, token_lists: Sequence[list[int]]) -> Future:
        """Scores of `token_lists` (an array, in their order) under `model`, as a future."""
        job = _Job(model, list(token_lists))
        with self._submit_lock:
            if self._closed or not self._thread.is_alive():
                job.future.set_exception(ShuttingDown("the scorer's model thread is not running"))
            else:
                self._queue.put(job)
        return job.future

    # -- the model thread ----------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    first: _Job | None
                    if self._pending:
                        first = self._pending.popleft()
                    elif self._stopping:
                        break
                    else:
                        first = self._queue.get()
                    if first is None:
                        break
                    self._score(self._gather(first))
        finally:
            self._fail_leftovers()

    def _gather(self, first: _Job) -> list[_Job]:
        """`first` plus jobs for the same model, until `max_docs` or the wait is over."""
        batch, n_docs = [first], len(first.token_lists)
        others: deque[_Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            if job.model is first.model and n_docs < self.max_docs:
                batch.append(job)
                n_docs += len(job.token_lists)
            else:
                others.append(job)
        self._pending = others
        deadline = time.monotonic() + self.wait_s
        while n_docs < self.max_docs and not self._stopping:
            left = deadline - time.monotonic()
            try:
                # Past the deadline, still take what is already queued: it costs no wait.
                queued = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if queued is None:
                self._stopping = True
                break
            if queued.model is first.model:
                batch.append(queued)
                n_docs += len(queued.token_lists)
            else:
                self._pending.append(queued)
        return batch

    def _score(self, batch: list[_Job]) -> None:
        # A job whose caller has gone away (its future cancelled) is dropped here.
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        tokens = [t for job in batch for t in job.token_lists]
        t0 = time.perf_counter()
        try:
            scores = batch[0].model.predict(tokens, self.max_docs)
        except Exception as e:  # every caller gets the error; the thread lives on
            log.exception("scoring %d documents failed", len(tokens))
            for job in batch:
                job.future.set_exception(e)
            return
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(tokens))
        log.debug(
            "scored %d documents from %d requests in %.3fs",
            len(tokens),
            len(batch),
            time.perf_counter() - t0,
        )
        start = 0
        for job in batch:
            end = start + len(job.token_lists)
            job.future.set_result(np.asarray(scores[start:end]))
            start = end

    def _fail_leftovers(self) -> None:
        self._stopping = True
        leftovers = list(self._pending)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                leftovers.append(job)
        for job in leftovers:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the scorer is shutting down"))
