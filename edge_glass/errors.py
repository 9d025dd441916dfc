"""Errors that name what went wrong and where (file, key path, sample)."""
from __future__ import annotations


class EdgeGlassError(Exception):
    """Base class: an error a user can act on, printed without a traceback by the CLI."""


class ConfigError(EdgeGlassError):
    """A config file or override is invalid; the message names the file and key path."""


class InputError(EdgeGlassError):
    """One input (image, audio file, caption) cannot be used; the data pipeline skips and counts it."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


class ModelNotFoundError(EdgeGlassError):
    """A model reference could not be turned into local files."""


class DataError(EdgeGlassError):
    """A dataset cannot be read at all (missing file, wrong format, nothing usable)."""
