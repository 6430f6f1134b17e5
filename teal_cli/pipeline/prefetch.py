"""Overlap the stages of a batched job (tokenize, cluster): I/O, device work, output."""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

C = TypeVar("C")
S = TypeVar("S")
L = TypeVar("L")
R = TypeVar("R")

_NONE = object()  # "no chunk yet" (None may be a real state)


def pipeline(chunks: Iterable[C], start: Callable[[C], S], launch: Callable[[S], L],
             emit: Callable[[L], Iterable[R]], depth: int = 1) -> Iterator[R]:
    """Three overlapped stages, results in input order.

    ``start`` chunk N+1 (submit its loads to a pool) before ``launch``-ing chunk N (wait for
    its loads, queue its device work), and ``emit`` chunk N-depth (wait for its results,
    yield them) only after chunk N is launched: the loaders, the device and the host's
    output work run at the same time, and with ``depth`` 2 the host can fall behind by up to
    a chunk without the device running dry.
    """
    started = _NONE
    launched: deque[L] = deque()
    for chunk in chunks:
        ahead = start(chunk)
        if started is not _NONE:
            launched.append(launch(started))
            while len(launched) > depth:
                yield from emit(launched.popleft())
        started = ahead
    if started is not _NONE:
        launched.append(launch(started))
    while launched:
        yield from emit(launched.popleft())


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
