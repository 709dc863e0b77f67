"""Project exceptions: every user-facing failure names the file, row or key at fault."""

from __future__ import annotations


class KtJaxError(Exception):
    """Base class; the CLI prints these as one line (no traceback) and exits with code 2."""


class ConfigError(KtJaxError):
    """A configuration file or override is invalid (names the key and the file)."""


class CheckpointError(KtJaxError):
    """A model checkpoint is missing, unsupported or inconsistent (names the file and the tensor)."""


class DataError(KtJaxError):
    """An input record is invalid (names the file, row index and field)."""


class ShardingError(KtJaxError):
    """A logical axis or mesh layout is invalid (names the axis)."""


class BackendError(KtJaxError):
    """An LLM backend call failed for good (after retries)."""
