"""The library's error hierarchy. HTTP codes and exit codes are chosen at the edges."""


class MatesError(Exception):
    """Base class for every error the library raises on purpose."""


class ConfigError(MatesError):
    """A config value is missing, malformed or out of range; the message names the field.

    `fields` holds where in the config each problem is (`("selection", "ratio")`), for a
    program to read; the message stays the one for people."""

    def __init__(self, message: str, fields: list[tuple[str | int, ...]] | None = None):
        super().__init__(message)
        self.fields: list[tuple[str | int, ...]] = fields or []


class DataError(MatesError):
    """Input data is unusable: bad rows, missing/duplicate IDs, empty sets."""


class ArtifactError(MatesError):
    """An artifact is missing, incomplete or cannot be written."""


class StageFailed(MatesError):
    """A stage stopped; the reason is recorded in the run manifest."""


class RunStateError(MatesError):
    """An operation does not fit the run's current state (e.g. resuming a finished run)."""
