"""The scorer's errors; `app.py` maps each to its HTTP status at the edge."""

from __future__ import annotations

from mates.errors import MatesError


class ScorerError(MatesError):
    """Base class of the errors a scoring request can end in; the message is the response."""


class BadModelName(ScorerError):
    """The `model` string is not `<run_id>/<stage>` or `<run_id>/latest`."""


class ModelNotFound(ScorerError):
    """No run with that ID, or the run has no influence model for that stage."""


class ModelNotReady(ScorerError):
    """The run exists but has not fitted any influence model yet."""


class TooLarge(ScorerError):
    """A request is over one of the configured size limits."""


class ShuttingDown(ScorerError):
    """The model thread is not running (the service is stopping or has failed)."""
