"""Exception types shared by every layer.

Errors that come from what the user gave us (a config, a data folder, a command-line
argument, a payload) derive from :class:`UserInputError`; the CLI turns them into a
one-line message and exit code 2. Everything else is a bug or an environment failure
(exit code 1).
"""

from __future__ import annotations


class FedpruneError(Exception):
    """Base class of all fedprune errors."""


class UserInputError(FedpruneError):
    """Bad input from the user: the CLI prints ``error: <message>`` and exits with 2."""


class ConfigError(UserInputError):
    """A configuration value is unknown, has the wrong type or an impossible value."""


class DataError(UserInputError):
    """A data set is missing, truncated or malformed."""


class DecodeError(FedpruneError, ValueError):
    """A payload could not be decoded: wrong magic, version, lengths, shapes or counts."""


class RoundFailedError(FedpruneError):
    """Too few clients answered a round, even after retries; the run stopped cleanly
    (every finished round is in ``metrics.jsonl``)."""


def elide(text: str, limit: int = 80) -> str:
    """``text`` on one line and at most ``limit`` characters (the middle elided with '...')."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    keep = max(limit - 3, 2)
    head = (keep + 1) // 2
    return flat[:head] + "..." + flat[len(flat) - (keep - head) :]
