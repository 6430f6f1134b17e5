"""Tokenize records: replace every media path by the token segment of its codec.

Work is streamed in windows of about ``batch_size`` media items, in three overlapped stages
(:func:`teal_cli.pipeline.prefetch.pipeline`): the loaders decode window N+1 while window N is
encoded and window N-1's ids are written out. Images are decoded and resized to uint8
pixels by the loaders (worker processes on many-core machines, see
:mod:`teal_cli.pipeline.loaders`); the codec's value mapping and the encoder run on its device.
Output order equals input order.
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from ..codecs.base import AudioCodec, Codec, ImageCodec
from ..errors import DataError, TealError, UsageError
from .loaders import ImageLoads, Loaders
from .prefetch import pipeline
from ..records import Record, Segment

if TYPE_CHECKING:
    import torch

    from ..media.pixels import PixelPrep


@dataclass
class TokenizeOptions:
    """How to tokenize.

    Attributes:
        batch_size: media items encoded together.
        image_size: override of image codecs' native size (fully convolutional codecs only).
        dedup: collapse runs of equal audio ids, keeping run lengths in ``durations``.
        on_error: ``fail`` stops at the first bad item; ``skip`` reports it and goes on.
        workers: loaders decoding media ahead of the encoder (None: one per core, at most 16).
        loader: ``auto``, ``threads`` or ``processes`` for images (see :mod:`teal_cli.pipeline.loaders`).
    """

    batch_size: int = 16
    image_size: int | None = None
    dedup: bool = False
    on_error: str = "fail"
    workers: int | None = None
    loader: str = "auto"


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
    data: "Future | object | None" = None
    size: "tuple[int, int] | None" = None  # content size when the codec padded the image
    load: "ImageLoads | None" = None  # image items: their window's loads, and their index there
    index: int = 0
    segment_out: Segment | None = None
    error: "TealError | None" = None  # found once encoded (no tokens at all)


def _load_audio(codec: AudioCodec, path: str) -> "torch.Tensor":
    from ..media.io import check_duration, load_audio

    wave = load_audio(path, codec.sample_rate)
    check_duration(wave, codec.sample_rate, codec.frame_rate, path, f"codec '{codec.name}'", codec.min_samples)
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


@dataclass
class _Run:
    """One ``tokenize_records`` call: what its three stages share."""

    codecs: Sequence[Codec]
    options: TokenizeOptions
    loaders: Loaders
    preps: dict[int, "PixelPrep"]  # by id of the image codec: its geometry
    stats: TokenizeStats
    warn: Callable[[str], None] | None


def tokenize_records(
    records: Iterable[Record],
    codecs: Sequence[Codec],
    options: TokenizeOptions | None = None,
    *,
    warn: Callable[[str], None] | None = None,
    stats: TokenizeStats | None = None,
    loaders: Loaders | None = None,
) -> Iterator[Record]:
    """Yield each record with its media segments tokenized.

    Segments that already hold tokens, and text, pass through unchanged. With
    ``on_error="skip"`` a record with a bad item is reported through ``warn`` and dropped;
    otherwise the first error is raised. ``loaders`` lets a long-lived caller keep one
    loader pool across calls (it is then left open); by default one is made from
    ``options.workers`` and ``options.loader`` and closed at the end.
    """
    options = options or TokenizeOptions()
    stats = stats if stats is not None else TokenizeStats()
    check_codecs(codecs)
    for codec in codecs:  # hashed (once per file, cached) before the first batch, not inside it
        codec.weights_id
    if options.on_error not in ("fail", "skip"):
        raise UsageError(f"--on-error {options.on_error}: expected fail or skip")
    # Geometry per image codec, checked once (a bad --image-size is a usage error, not a bad file).
    preps = {id(c): c.pixel_prep(options.image_size) for c in codecs if isinstance(c, ImageCodec)}

    own = loaders is None
    if own:
        loaders = Loaders(options.workers, options.loader)
    run = _Run(codecs, options, loaders, preps, stats, warn)
    try:
        yield from pipeline(_windows(records, options.batch_size), partial(_start, run), partial(_launch, run),
                            partial(_emit, run))
    finally:
        if own:
            loaders.close()


def _start(run: _Run, window: list[Record]) -> tuple[list[Record], list[_Item], dict[int, str]]:
    """Stage 1: the window's items, their loads submitted (images: one loader call per codec);
    ``failed``: the usage errors of skipped records, by index in the window."""
    items: list[_Item] = []
    failed: dict[int, str] = {}
    images: dict[int, list[_Item]] = {}
    for r, record in enumerate(window):
        for s, seg in enumerate(record.segments):
            if seg.path is None or seg.tokens is not None:
                continue
            where = f"record '{record.id}' segment {s} ({seg.path})"
            try:
                item = _Item(record, r, s, codec_for(run.codecs, seg.modality, where), where)
            except UsageError as exc:
                if run.options.on_error == "fail":
                    raise
                failed.setdefault(r, str(exc))
                continue
            if isinstance(item.codec, ImageCodec):
                images.setdefault(id(item.codec), []).append(item)
            else:
                item.data = run.loaders.submit(_load_audio, item.codec, seg.path)
            items.append(item)
    for group in images.values():
        load = run.loaders.load_images(run.preps[id(group[0].codec)], [i.target.segments[i.segment].path for i in group])
        for index, item in enumerate(group):
            item.load, item.index = load, index
    return window, items, failed


def _launch(run: _Run, started) -> tuple:
    """Stage 2: wait for the window's loads, queue its encoding."""
    window, items, failed = started
    ready: list[_Item] = []
    for item in items:
        try:
            item.data = item.load.result(item.index) if item.load is not None else item.data.result()  # type: ignore[union-attr]
        except BrokenProcessPool:
            raise DataError(f"{item.where}: an image loader process died (a crash in the image decoder?); "
                            "rerun with --loader threads to see which file fails") from None
        except TealError as exc:
            if run.options.on_error == "fail":
                raise
            failed.setdefault(item.record, str(exc))
            continue
        if isinstance(item.codec, ImageCodec):
            item.data, item.size = item.data
        ready.append(item)
    return window, failed, _encode(ready, run.options)


def _emit(run: _Run, launched) -> Iterator[Record]:
    """Stage 3: wait for the window's ids, yield its records (reporting the skipped ones)."""
    window, failed, complete = launched
    for r, exc in complete().items():
        if run.options.on_error == "fail":
            raise exc
        failed.setdefault(r, str(exc))
    for r, record in enumerate(window):
        if r in failed:
            run.stats.skipped += 1
            run.stats.errors.append(failed[r])
            if run.warn is not None:
                run.warn(f"skipped: {failed[r]}")
            continue
        run.stats.records += 1
        yield record


def _encode(items: list[_Item], options: TokenizeOptions) -> Callable[[], dict[int, TealError]]:
    """Queue the encoding of loaded items (images grouped by codec and size, audio by codec);
    the returned function waits for the ids, puts the new segments in place and returns the
    errors found then (item ``error``), by record index in the window."""
    import torch

    groups: dict[tuple, list[_Item]] = {}
    for item in items:
        key = (id(item.codec), tuple(item.data.shape) if isinstance(item.codec, ImageCodec) else None)
        groups.setdefault(key, []).append(item)
    finishers: list[Callable[[], None]] = []
    with torch.inference_mode():
        for group in groups.values():
            codec = group[0].codec
            if isinstance(codec, ImageCodec):
                finishers.append(_encode_images(codec, group))
            else:
                finishers.append(_encode_audio(codec, group, options.dedup))

    def complete() -> dict[int, TealError]:
        for finish in finishers:
            finish()
        # Segments are replaced after all encodes succeeded, so a failing batch leaves records untouched.
        errors: dict[int, TealError] = {}
        for item in items:
            if item.error is not None:
                errors.setdefault(item.record, item.error)
            else:
                # The input segment's own keys (role, speaker, lang, ...) stay with its tokens.
                before = item.target.segments[item.segment]
                item.segment_out.extra = {**before.extra, **item.segment_out.extra}
                item.target.segments[item.segment] = item.segment_out
            item.data = None
        return errors

    return complete


def _encode_images(codec: ImageCodec, group: list[_Item]) -> Callable[[], None]:
    import numpy as np
    import torch

    from ..runtime.device import host_copy_later, upload

    device = torch.device(codec.device)
    # Stacked straight into pinned memory on CUDA, so the upload is one asynchronous copy.
    pixels = torch.empty((len(group), *group[0].data.shape), dtype=torch.uint8, pin_memory=device.type == "cuda")
    if isinstance(group[0].data, torch.Tensor):  # from loader processes
        torch.stack([i.data for i in group], out=pixels)
    else:
        np.stack([i.data for i in group], out=pixels.numpy())
    ids = host_copy_later(codec.encode(codec.normalize(upload(pixels, device))))

    weights = codec.weights_id or None

    def finish() -> None:
        grids = ids()
        shape = list(grids.shape[1:])
        for item, tokens in zip(group, grids.reshape(len(group), -1).tolist()):  # one conversion for the batch
            item.segment_out = Segment(modality="image", codec=codec.name, weights=weights, shape=list(shape), tokens=tokens)
            if item.size is not None:
                item.segment_out.extra["size"] = list(item.size)

    return finish


def _encode_audio(codec: Codec, group: list[_Item], dedup: bool) -> Callable[[], None]:
    import torch

    from ..runtime.device import host_copy_later

    seqs = codec.encode([i.data for i in group])
    lengths = [int(s.shape[0]) for s in seqs]
    ids = host_copy_later(torch.cat([s.reshape(-1) for s in seqs]))

    def finish() -> None:
        for item, seq in zip(group, ids().split(lengths)):
            if seq.numel() == 0:  # a codec whose min_samples is too small: never an empty segment
                item.error = DataError(f"{item.where}: codec '{codec.name}' gave no tokens for "
                                       f"{item.data.shape[-1]} samples (too short for its first frame)")
                continue
            item.segment_out = _audio_segment(codec, seq, dedup)

    return finish


def _audio_segment(codec: Codec, ids: "torch.Tensor", dedup: bool) -> Segment:
    import torch

    seg = Segment(modality="audio", codec=codec.name, weights=codec.weights_id or None, **codec.segment_fields())
    if dedup:
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        seg.tokens, seg.durations = values.tolist(), counts.tolist()
    else:
        seg.tokens = ids.tolist()
    return seg
