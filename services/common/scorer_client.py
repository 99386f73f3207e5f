"""The one client of the scorer service: the workers score pool shards through it, the
API relays `/v1/score` through it. Both send the deployment's key and the same timeout."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from mates.errors import ArtifactError
from services.common.errors import ScorerUnavailable
from services.common.settings import Settings

SCORE_PATH = "/v1/score"


class ScorerClient:
    """Where the scorer is and how to call it, from `settings` (`MATES_SCORER_URL`,
    `MATES_API_KEY`, `MATES_HTTP_TIMEOUT_S`)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.scorer_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {settings.api_key}"}
        self.timeout = settings.http_timeout_s

    def sync(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=self.timeout, headers=self.headers)

    def asynchronous(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=self.timeout, headers=self.headers)

    def score_texts(self, version: str) -> Callable[[list[str], list[str]], list[float]]:
        """`score_texts(ids, texts)` scoring with model `version` in request-sized chunks.

        Unreachable, 5xx or 429: ScorerUnavailable (the shard retries); any other refusal
        is an ArtifactError naming the status."""
        s = self.settings

        def score_texts(ids: list[str], texts: list[str]) -> list[float]:
            # The model reads only its first `max_tokens` tokens; cutting what is sent to the
            # scorer's character limit changes no score, and a huge document fails nothing.
            texts = [t[: s.scorer_max_chars] for t in texts]
            per = min(s.scorer_max_documents, 256)
            out: list[float] = []
            with self.sync() as client:
                for i in range(0, len(ids), per):
                    docs = [
                        {"id": d, "text": t}
                        for d, t in zip(ids[i : i + per], texts[i : i + per], strict=True)
                    ]
                    try:
                        r = client.post(SCORE_PATH, json={"model": version, "documents": docs})
                    except httpx.TransportError as e:
                        raise ScorerUnavailable(
                            f"scorer at {s.scorer_url} unreachable: {type(e).__name__}: {e}"
                        ) from e
                    if r.status_code >= 500 or r.status_code == 429:
                        raise ScorerUnavailable(f"scorer answered {r.status_code}: {r.text[:200]}")
                    if r.status_code != 200:
                        raise ArtifactError(
                            f"scorer refused the shard ({r.status_code}): {r.text[:300]}"
                        )
                    got = {row["id"]: row["score"] for row in r.json()}
                    out.extend(float(got[d["id"]]) for d in docs)
            return out

        return score_texts
