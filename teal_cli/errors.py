"""The exceptions teal raises for problems a user can fix.

Anything that is not a ``TealError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class TealError(Exception):
    """A problem with input, configuration or environment, explained in one line.

    ``exit_code`` is what the CLI exits with: 1 for runtime/data errors, 2 for usage.
    """

    exit_code = 1


class UsageError(TealError):
    """The command line or call itself is wrong (bad option value, missing input)."""

    exit_code = 2


class DataError(TealError):
    """An input file or record is malformed; the message names where."""


class CodecError(TealError):
    """A codec cannot be found, loaded, or does not fit the data it was given."""


class DownloadError(TealError):
    """A named checkpoint is not cached and cannot be downloaded."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of its message"`` (at most ``limit`` characters of it; the type
    alone for an empty message): how a library's exception is quoted inside a one-line
    :class:`TealError`."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")
