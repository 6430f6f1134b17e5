"""teal generate: being built (see the open issue)."""

from __future__ import annotations

from .common import handle_errors

HELP = """Not built yet."""


@handle_errors
def generate() -> None:
    from ..errors import UsageError

    raise UsageError("teal generate is not built yet")
