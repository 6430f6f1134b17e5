"""Tokenize records: replace every media path by the token segment of its codec.

Work is streamed in windows of about ``batch_size`` media items. Decoding and
preprocessing run in a thread pool one window ahead of encoding (Pillow, soundfile and soxr
release the GIL), so the encoder, on CPU or GPU, is not left waiting for files. Output order
equals input order.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from .codecs.base import AudioCodec, Codec, ImageCodec
from .errors import TealError, UsageError
from .prefetch import one_ahead
from .records import Record, Segment

if TYPE_CHECKING:
    import torch


@dataclass
class TokenizeOptions:
    """How to tokenize.

    Attributes:
        batch_size: media items encoded together.
        image_size: override of image codecs' native size (fully convolutional codecs only).
        dedup: collapse runs of equal audio ids, keeping run lengths in ``durations``.
        on_error: ``fail`` stops at the first bad item; ``skip`` reports it and goes on.
        workers: threads decoding media ahead of the encoder.
    """

    batch_size: int = 16
    image_size: int | None = None
    dedup: bool = False
    on_error: str = "fail"
    workers: int = 4


@dataclass
class TokenizeStats:
    records: int = 0
    items: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def codec_for(codecs: Sequence[Codec], modality: str, where: str) -> Codec:
    """The one codec given for ``modality``."""
    matches = [c for c in codecs if c.modality == modality]
    if not matches:
        given = ", ".join(f"{c.name} ({c.modality})" for c in codecs) or "none"
        raise UsageError(f"{where}: a {modality} item needs a {modality} codec (--codec); given: {given}")
    return matches[0]


def check_codecs(codecs: Sequence[Codec]) -> None:
    seen: dict[str, str] = {}
    for codec in codecs:
        if codec.modality in seen:
            raise UsageError(f"--codec {seen[codec.modality]} and --codec {codec.name} are both {codec.modality} codecs; give one per modality")
        seen[codec.modality] = codec.name


@dataclass
class _Item:
    target: Record
    record: int  # index in the window
    segment: int
    codec: Codec
    where: str
    data: "Future | torch.Tensor | None" = None
    segment_out: Segment | None = None
    size: "tuple[int, int] | None" = None  # content size when the codec padded the image


def _load(item: _Item, path: str, image_size: int | None) -> "torch.Tensor":
    from .media import check_duration, load_audio, load_image

    if isinstance(item.codec, ImageCodec):
        image = load_image(path)
        item.size = item.codec.content_size(image, image_size)
        return item.codec.preprocess(image, image_size)
    assert isinstance(item.codec, AudioCodec)
    wave = load_audio(path, item.codec.sample_rate)
    check_duration(wave, item.codec.sample_rate, item.codec.frame_rate, path, f"codec '{item.codec.name}'")
    return wave


def _windows(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    window: list[Record] = []
    count = 0
    for record in records:
        window.append(record)
        count += sum(1 for s in record.segments if s.path is not None and s.tokens is None)
        if count >= size:
            yield window
            window, count = [], 0
    if window:
        yield window


def tokenize_records(
    records: Iterable[Record],
    codecs: Sequence[Codec],
    options: TokenizeOptions | None = None,
    *,
    warn: Callable[[str], None] | None = None,
    stats: TokenizeStats | None = None,
) -> Iterator[Record]:
    """Yield each record with its media segments tokenized.

    Segments that already hold tokens, and text, pass through unchanged. With
    ``on_error="skip"`` a record with a bad item is reported through ``warn`` and dropped;
    otherwise the first error is raised.
    """
    options = options or TokenizeOptions()
    stats = stats if stats is not None else TokenizeStats()
    check_codecs(codecs)
    if options.on_error not in ("fail", "skip"):
        raise UsageError(f"--on-error {options.on_error}: expected fail or skip")

    with ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="teal-load") as pool:

        def submit(window: list[Record]) -> tuple[list[Record], list[_Item], dict[int, str]]:
            items: list[_Item] = []
            failed: dict[int, str] = {}
            for r, record in enumerate(window):
                for s, seg in enumerate(record.segments):
                    if seg.path is None or seg.tokens is not None:
                        continue
                    where = f"record '{record.id}' segment {s} ({seg.path})"
                    try:
                        item = _Item(record, r, s, codec_for(codecs, seg.modality, where), where)
                    except UsageError as exc:
                        if options.on_error == "fail":
                            raise
                        failed.setdefault(r, str(exc))
                        continue
                    item.data = pool.submit(_load, item, seg.path, options.image_size)
                    items.append(item)
            return window, items, failed

        yield from one_ahead(_windows(records, options.batch_size), submit,
                             lambda started: _finish(*started, options, stats, warn))


def _finish(window: list[Record], items: list[_Item], failed: dict[int, str], options: TokenizeOptions,
            stats: TokenizeStats, warn: Callable[[str], None] | None) -> Iterator[Record]:
    ready: list[_Item] = []
    for item in items:
        try:
            item.data = item.data.result()  # type: ignore[union-attr]
            ready.append(item)
        except TealError as exc:
            if options.on_error == "fail":
                raise
            failed.setdefault(item.record, str(exc))
    _encode(ready, options)
    for r, record in enumerate(window):
        if r in failed:
            stats.skipped += 1
            stats.errors.append(failed[r])
            if warn is not None:
                warn(f"skipped: {failed[r]}")
            continue
        stats.records += 1
        yield record


def _encode(items: list[_Item], options: TokenizeOptions) -> None:
    """Encode loaded items in place: images grouped by codec and size, audio by codec."""
    import torch

    groups: dict[tuple, list[_Item]] = {}
    for item in items:
        key = (id(item.codec), tuple(item.data.shape) if isinstance(item.codec, ImageCodec) else None)
        groups.setdefault(key, []).append(item)
    with torch.inference_mode():
        for group in groups.values():
            codec = group[0].codec
            if isinstance(codec, ImageCodec):
                ids = codec.encode(torch.stack([i.data for i in group]))
                for item, grid in zip(group, ids.cpu()):
                    item.segment_out = Segment(modality="image", codec=codec.name, shape=list(grid.shape),
                                               tokens=grid.flatten().tolist())
                    if item.size is not None:
                        item.segment_out.extra["size"] = list(item.size)
            else:
                for item, seq in zip(group, codec.encode([i.data for i in group])):
                    item.segment_out = _audio_segment(codec, seq.cpu(), options.dedup)
    # Segments are replaced after all encodes succeeded, so a failing batch leaves records untouched.
    for item in items:
        item.target.segments[item.segment] = item.segment_out
        item.data = None


def _audio_segment(codec: Codec, ids: "torch.Tensor", dedup: bool) -> Segment:
    import torch

    seg = Segment(modality="audio", codec=codec.name, **codec.segment_fields())
    if dedup:
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        seg.tokens, seg.durations = values.tolist(), counts.tolist()
    else:
        seg.tokens = ids.tolist()
    return seg
