"""The load: clients sending requests back to back, what each phase saw (latencies, errors
by kind, documents, model versions), the check of every answer, and the scorer's memory."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from services.common.contracts import MODEL_VERSION_HEADER

log = logging.getLogger("mates.loadtest")


@dataclass
class Phase:
    """What one phase (warm-up or measured) of the load saw."""

    latencies_s: list[float] = field(default_factory=list)  # of successful requests
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    docs: int = 0
    versions: set[str] = field(default_factory=set)


def check_scores(resp: httpx.Response, ids: list[str]) -> str | None:
    """Why a 200 answer is wrong, or None: one finite score per document, in request order."""
    try:
        rows = resp.json()
        got = [row["id"] for row in rows]
        scores = [float(row["score"]) for row in rows]
    except (ValueError, TypeError, KeyError):
        return "bad body: not a list of {id, score}"
    if got != ids:
        return f"bad body: {len(got)} ids for {len(ids)} documents, or out of order"
    if not all(math.isfinite(s) for s in scores):
        return "bad body: a score is not finite"
    if MODEL_VERSION_HEADER not in resp.headers:
        return f"bad body: no {MODEL_VERSION_HEADER} header"
    return None


@dataclass
class Workload:
    """What every request carries: `docs_per_request` texts drawn from `texts`, for `model`."""

    model: str
    texts: list[str]
    docs_per_request: int

    def request(self, rng: np.random.Generator, prefix: str) -> tuple[list[str], dict]:
        """(document IDs, body) of one request; IDs are unique across the whole test."""
        ids = [f"{prefix}-{j}" for j in range(self.docs_per_request)]
        picks = rng.integers(len(self.texts), size=self.docs_per_request)
        docs = [{"id": i, "text": self.texts[p]} for i, p in zip(ids, picks, strict=True)]
        return ids, {"model": self.model, "documents": docs}


async def _client(
    client: httpx.AsyncClient,
    work: Workload,
    rng: np.random.Generator,
    deadline: float,
    budget: list[int],
    tag: str,
    phase: Phase,
) -> None:
    """One client: requests back to back until the deadline or the shared budget runs out."""
    n = 0
    while time.perf_counter() < deadline and budget[0] > 0:
        budget[0] -= 1  # one event loop, so no lock
        ids, body = work.request(rng, f"{tag}-{n}")
        n += 1
        t0 = time.perf_counter()
        try:
            resp = await client.post("/v1/score", json=body)
        except httpx.HTTPError as e:
            phase.requests += 1
            phase.errors[type(e).__name__] += 1
            continue
        elapsed = time.perf_counter() - t0
        phase.requests += 1
        problem = f"HTTP {resp.status_code}" if resp.status_code != 200 else check_scores(resp, ids)
        if problem:
            phase.errors[problem] += 1
            log.debug("%s: %s", problem, resp.text[:200])
            continue
        phase.latencies_s.append(elapsed)
        phase.docs += len(ids)
        phase.versions.add(resp.headers[MODEL_VERSION_HEADER])


async def _drive(
    client: httpx.AsyncClient,
    work: Workload,
    clients: int,
    seconds: float,
    max_requests: int,
    seed: int,
) -> tuple[Phase, float]:
    """All clients at once for `seconds` (at most `max_requests`); the phase and its wall time."""
    phase, budget = Phase(), [max_requests]
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            _client(
                client, work, np.random.default_rng([seed, i]), t0 + seconds, budget, f"c{i}", phase
            )
            for i in range(clients)
        )
    )
    return phase, time.perf_counter() - t0


def rss_mib(pid: int) -> float | None:
    """Resident memory of process `pid` (VmRSS in /proc/PID/status), or None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


async def _sample_rss(pid: int, every_s: float, out: list[tuple[float, float]]) -> None:
    t0 = time.perf_counter()
    while True:
        mib = rss_mib(pid)
        if mib is not None:
            out.append((round(time.perf_counter() - t0, 1), round(mib, 1)))
        await asyncio.sleep(every_s)
