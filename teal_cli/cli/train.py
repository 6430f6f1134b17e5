"""teal train: being built (see the open issue)."""

from __future__ import annotations

from .common import handle_errors

HELP = """Not built yet."""


@handle_errors
def train() -> None:
    from ..errors import UsageError

    raise UsageError("teal train is not built yet")
