"""`/metrics` in Prometheus' text format, for the API and the scorer.

Request counts and latencies by route and status come from
prometheus-fastapi-instrumentator (the well-kept FastAPI middleware); what only these
services know is added as collectors read at scrape time: the Celery queues' depths in the
broker and the runs by status (the API), the scorer's batch sizes, documents scored and
model-cache hits and loads (the scorer). Each app has its own registry, so several apps in
one process (the tests) never collide. The route takes the read key like every read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"


def install_metrics(
    app: FastAPI, read_key: Any, collectors: Iterable[Collector] = ()
) -> CollectorRegistry:
    """Instrument `app`'s requests and serve its registry at /metrics behind `read_key`
    (an `Annotated[None, Depends(...)]`)."""
    registry = CollectorRegistry()
    Instrumentator(
        should_group_status_codes=False, excluded_handlers=[METRICS_PATH], registry=registry
    ).instrument(app)
    for collector in collectors:
        registry.register(collector)

    def metrics(_: None) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # the dependency is a value of the caller's; annotations here are strings (PEP 563)
    metrics.__annotations__ = {"_": read_key, "return": Response}

    app.add_api_route(METRICS_PATH, metrics, methods=["GET"], include_in_schema=False)
    return registry


class FunctionCollector(Collector):
    """Metric families computed by a function at each scrape; a failure is logged and
    leaves those families out of that scrape instead of failing it."""

    def __init__(self, name: str, collect: Callable[[], Iterator[Any]]):
        self.name = name
        self._collect = collect

    def collect(self) -> Iterator[Any]:
        try:
            yield from list(self._collect())
        except Exception as e:  # the broker or the store is down: the rest still scrapes
            log.warning("metrics: %s not collected: %s", self.name, e)

    def describe(self) -> list[Any]:
        return []  # computed at scrape time only


def gauge(name: str, doc: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
