"""Run the I/O of the next chunk while the current one is computed (tokenize, cluster)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

C = TypeVar("C")
S = TypeVar("S")
R = TypeVar("R")


def one_ahead(chunks: Iterable[C], start: Callable[[C], S], finish: Callable[[S], Iterable[R]]) -> Iterator[R]:
    """``start`` chunk N+1 (e.g. submit its loads to a pool) before ``finish``-ing chunk N,
    so decoding overlaps encoding; results come out in input order."""
    pending = None
    for chunk in chunks:
        ahead = start(chunk)
        if pending is not None:
            yield from finish(pending)
        pending = ahead
    if pending is not None:
        yield from finish(pending)


def batched(items: Iterable[C], size: int) -> Iterator[list[C]]:
    """Lists of ``size`` consecutive items (the last may be shorter)."""
    chunk: list[C] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
