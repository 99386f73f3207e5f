"""A small client of the control plane, used by `mates runs ...`."""

from __future__ import annotations

import builtins
from typing import Any
from urllib.parse import quote

import httpx

from mates.errors import MatesError


class ApiError(MatesError):
    """The API answered with an error, or could not be reached (`status_code` None)."""

    def __init__(self, message: str, status_code: int | None = None, detail: Any = None):
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


def format_detail(detail: Any) -> str:
    """FastAPI's `detail`: a message, or a list of validation errors naming their fields."""
    if isinstance(detail, list):
        parts = []
        for e in detail:
            if isinstance(e, dict):
                where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
                parts.append(
                    f"`{where}` {e.get('msg', '')}".strip() if where else str(e.get("msg"))
                )
            else:
                parts.append(str(e))
        return "; ".join(parts)
    return str(detail)


def _q(run_id: str) -> str:
    return quote(run_id, safe="")


class ApiClient:
    """`submit`, `list`, `show`, ...: each returns the decoded JSON or raises `ApiError`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise ApiError(f"the MATES API at {self.base_url} did not answer in time") from None
        except httpx.TransportError as e:
            raise ApiError(
                f"cannot reach the MATES API at {self.base_url} ({e}); is `mates serve "
                "api` running, and is --api / MATES_API_URL right?"
            ) from None
        if r.is_success:
            return r.json()
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text.strip() or r.reason_phrase
        hint = {401: " (set MATES_API_KEY)", 403: " (check MATES_API_KEY)"}.get(r.status_code, "")
        raise ApiError(
            f"{method} {path}: {r.status_code} {format_detail(detail)}{hint}", r.status_code, detail
        )

    def submit(self, config: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/runs", json=config)

    def list(self, status: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._call("GET", "/v1/runs", params=params)

    def show(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/runs/{_q(run_id)}")

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/runs/{_q(run_id)}/cancel")

    def resume(self, run_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/runs/{_q(run_id)}/resume")

    def metrics(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/runs/{_q(run_id)}/metrics")

    def selection(self, run_id: str, stage: int) -> dict[str, Any]:
        return self._call("GET", f"/v1/runs/{_q(run_id)}/stages/{stage}/selection")

    # `builtins.list`: the class's own `list` method shadows the type in its body
    def models(self, run_id: str | None = None) -> builtins.list[dict[str, Any]]:
        return self._call("GET", "/v1/models", params={"run_id": run_id} if run_id else None)

    def score(
        self, model: str, documents: builtins.list[dict[str, str]]
    ) -> builtins.list[dict[str, Any]]:
        """Scores of `documents` ({id, text}) by `model` (`<run_id>/<stage>` or `/latest`):
        `[{id, score}]` in the order of `documents`."""
        return self._call("POST", "/v1/score", json={"model": model, "documents": documents})
