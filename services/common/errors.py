"""The services' own failures, and which of them a task retries."""

from __future__ import annotations

import httpx
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError

from mates.errors import MatesError


class TransientError(Exception):
    """A failure worth retrying: the scorer, broker or database was briefly unavailable."""


class ScorerUnavailable(TransientError):
    """The scorer did not answer, or answered 5xx/429: the shard waits and retries."""


class BrokerUnavailable(MatesError):
    """The broker did not take a task; the run is marked failed and can be resumed."""


class PublishPending(MatesError):
    """Another process claimed this enqueue and has not confirmed it yet."""


TRANSIENT: tuple[type[BaseException], ...] = (
    TransientError,
    httpx.TransportError,
    OperationalError,
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    BrokerUnavailable,
    PublishPending,
)
"""What a stage task retries with backoff; anything else fails its stage."""
