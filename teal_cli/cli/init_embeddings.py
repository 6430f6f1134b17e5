"""teal init-embeddings: being built (see the open issue)."""

from __future__ import annotations

from .common import handle_errors

HELP = """Not built yet."""


@handle_errors
def init_embeddings() -> None:
    from ..errors import UsageError

    raise UsageError("teal init-embeddings is not built yet")
