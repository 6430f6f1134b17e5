"""What a command's positional inputs mean: media files, folders, JSONL manifests, ``-``.

Everything becomes a stream of :class:`~teal_cli.records.Record`: a media file is a record
with one segment to tokenize; a folder is its media files, sorted, recursively; a ``.jsonl``
file (or ``-``, stdin) is read as records or manifest entries, with relative media paths
resolved against the manifest's own folder.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import IO, Iterable, Iterator

from ..errors import DataError, UsageError
from .io import modality_of
from ..records import Record, Segment, read_records

JSONL_EXTENSIONS = frozenset({".jsonl", ".ndjson", ".json"})


def stdin_or_usage_error(inputs: list[str], what: str = "input") -> list[str]:
    """No inputs means stdin, but only when something is piped in: a terminal would hang."""
    if inputs:
        return inputs
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(f"no {what} given: name files or folders, or pipe JSONL records into stdin ('-')")
    return ["-"]


def _media_record(path: str, modality: str) -> Record:
    return Record(id=path, segments=[Segment(modality=modality, path=path)])


def _walk(folder: str) -> Iterator[tuple[str, str]]:
    """``(path, modality)`` of the media files under ``folder``, sorted per directory.
    Paths stay strings: a ``Path`` per file cost the main thread about as much as the rest
    of its work for an image."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            modality = None if name.startswith(".") else modality_of(name)
            if modality:
                yield os.path.join(root, name), modality


def _resolve_paths(record: Record, base: Path | None) -> Record:
    if base is None:
        return record
    for seg in record.segments:
        if seg.path is not None and not os.path.isabs(seg.path):
            seg.path = str(base / seg.path)
    return record


def iter_input_records(inputs: Iterable[str], stdin: IO[str] | None = None) -> Iterator[Record]:
    """Expand positional inputs to records, lazily and in order."""
    for item in inputs:
        if item == "-":
            stream = stdin if stdin is not None else sys.stdin
            yield from read_records(getattr(stream, "buffer", stream), "<stdin>")
            continue
        try:
            mode = os.stat(item).st_mode  # one stat, not is_dir() then is_file()
        except (OSError, ValueError):
            mode = 0
        if stat.S_ISDIR(mode):
            found = False
            for path, modality in _walk(str(Path(item))):  # ids as Path spells them ("./a/" -> "a/...")
                found = True
                yield _media_record(path, modality)
            if not found:
                raise DataError(f"{item}: folder holds no image or audio files")
        elif stat.S_ISREG(mode):
            if os.path.splitext(item)[1].lower() in JSONL_EXTENSIONS:
                with open(item, "rb") as f:
                    for record in read_records(f, item):
                        yield _resolve_paths(record, Path(item).parent)
            elif modality := modality_of(item):
                yield _media_record(item, modality)
            else:
                raise DataError(f"{item}: not a media file (image/audio by extension) nor a .jsonl manifest")
        else:
            raise DataError(f"{item}: no such file or folder")


def iter_media_paths(inputs: Iterable[str], modality: str, stdin: IO[str] | None = None) -> Iterator[tuple[str, str]]:
    """``(id, path)`` of every media item of ``modality`` the inputs name (for ``teal cluster``)."""
    for record in iter_input_records(inputs, stdin):
        for i, seg in enumerate(record.segments):
            if seg.modality == modality and seg.path is not None:
                key = record.id if len(record.segments) == 1 else f"{record.id}#{i}"
                yield key, seg.path


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``I/N`` (0-based shard I of N) or ``auto`` (RANK/WORLD_SIZE set by torchrun or
    accelerate; 0/1 when unset) to ``(index, count)``."""
    if spec is None:
        return 0, 1
    if spec == "auto":
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        world = os.environ.get("WORLD_SIZE", "1")
        spec = f"{rank}/{world}"
    index, sep, count = spec.partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or int(count) < 1 or int(index) >= int(count):
        raise UsageError(f"--shard {spec}: expected I/N with 0 <= I < N (e.g. 0/4), or auto")
    return int(index), int(count)


def shard_records(records: Iterable[Record], index: int, count: int) -> Iterator[Record]:
    """Every ``count``-th record starting at ``index``: shards partition the input, and
    concatenating the shards' outputs gives every record exactly once."""
    for i, record in enumerate(records):
        if i % count == index:
            yield record
