"""Detokenize records: decode every image/audio token segment to a PNG / WAV file.

``-o`` is one of:
- a file (``out.png``): the stream must hold exactly one decodable segment; it is written
  only after the input ends, so a stream with more leaves nothing behind;
- a folder (an existing directory, or a path ending in ``/``): ``<folder>/<id>[-<n>].<ext>``;
- a pattern with ``{id}`` (and optionally ``{n}``, the segment's index among the record's
  media segments, and ``{modality}``).
Every file is written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..codecs.base import AudioCodec, ImageCodec, check_segment_weights
from ..codecs.registry import CodecCache
from ..errors import DataError, TealError, UsageError
from ..media.io import modality_of
from ..media.outputs import OutputTarget
from ..records import Record, Segment

if TYPE_CHECKING:
    import torch

    from ..codecs.vocoder import UnitVocoder

@dataclass
class DetokenizeStats:
    written: list[Path] = field(default_factory=list)
    skipped: int = 0


def segment_ids(seg: Segment, codec, where: str) -> "torch.Tensor":
    """The segment's ids as a tensor ready for ``codec.decode`` (grid for images, frames for audio)."""
    import torch

    ids = torch.tensor(seg.tokens, dtype=torch.long)
    codec.check_ids(ids, where)
    if isinstance(codec, ImageCodec):
        if seg.shape is None or len(seg.shape) != 2:
            raise DataError(f"{where}: image segment needs a 2-d 'shape' [h, w] to be decoded, got {seg.shape}")
        return ids.reshape(1, *seg.shape)
    if seg.durations is not None:
        ids = torch.repeat_interleave(ids, torch.tensor(seg.durations, dtype=torch.long))
    return ids


def decode_segment(seg: Segment, codec, where: str, vocoder: "UnitVocoder | None" = None):
    """Decode one segment to a PIL image or ``(waveform, sample_rate)``.

    With a ``vocoder``, audio segments are vocoded from their unit ids (and durations)
    instead of going through the codec's own decoder.
    """
    import torch

    from ..media.io import tensor_to_image

    if seg.modality != codec.modality:
        raise DataError(f"{where}: {seg.modality} segment names {codec.modality} codec '{codec.name}'")
    check_segment_weights(seg, codec, where)
    if vocoder is not None and isinstance(codec, AudioCodec):
        vocoder.check_codec(codec)
        ids = torch.tensor(seg.tokens, dtype=torch.long)
        codec.check_ids(ids, where)
        return vocoder.decode(ids, seg.durations).cpu(), vocoder.sample_rate
    if not codec.has_decoder:
        raise codec.no_decoder_error()
    ids = segment_ids(seg, codec, where)
    with torch.inference_mode():
        if isinstance(codec, ImageCodec):
            pixels = codec.decode(ids)[0]
            size = seg.extra.get("size")
            if size is not None:
                if (not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)
                        or size[0] > pixels.shape[1] or size[1] > pixels.shape[2]):
                    raise DataError(f"{where}: field 'size' must be [height, width] within the decoded "
                                    f"{pixels.shape[1]}x{pixels.shape[2]} pixels, got {size}")
                pixels = pixels[:, : size[0], : size[1]]
            return tensor_to_image(pixels)
        assert isinstance(codec, AudioCodec)
        return codec.decode(ids).cpu(), codec.sample_rate


def _save(media, path: Path, modality: str) -> None:
    from ..media.io import save_audio, save_image

    if modality_of(path) not in (None, modality):
        raise UsageError(f"-o {path}: a {modality} segment cannot be written as {path.suffix}")
    if modality == "image":
        save_image(media, path)
    else:
        save_audio(media[0], media[1], path)


def detokenize_records(records: Iterable[Record], codecs: CodecCache, target: OutputTarget, *,
                       on_error: str = "fail", warn: Callable[[str], None] | None = None,
                       stats: DetokenizeStats | None = None, vocoder: "UnitVocoder | None" = None) -> DetokenizeStats:
    """Decode all media token segments of ``records`` into files named by ``target``.

    ``vocoder`` (see :func:`teal_cli.codecs.vocoder.load_vocoder`) decodes every audio segment.
    """
    stats = stats if stats is not None else DetokenizeStats()
    single: tuple | None = None
    for record in records:
        media = [(i, s) for i, s in enumerate(record.segments) if s.is_tokens]
        try:
            outputs = []
            for n, (i, seg) in enumerate(media):
                where = f"record '{record.id}' segment {i}"
                codec = codecs.get(seg.codec)
                outputs.append((n, seg.modality, decode_segment(seg, codec, where, vocoder)))
        except TealError as exc:
            if on_error == "fail":
                raise
            stats.skipped += 1
            if warn is not None:
                warn(f"skipped: {exc}")
            continue
        for n, modality, decoded in outputs:
            if target.kind == "file":
                if single is not None:
                    raise UsageError(f"-o {target.spec} names one file but the input holds more than one decodable segment "
                                     f"(record '{record.id}'); give a folder or a pattern with {{id}}")
                single = (decoded, modality)
                continue
            path = target.path_for(record.id, n, len(media) > 1, modality)
            _save(decoded, path, modality)
            stats.written.append(path)
    if target.kind == "file":
        if single is None:
            raise DataError("input holds no image or audio token segment to decode")
        _save(single[0], Path(target.spec), single[1])
        stats.written.append(Path(target.spec))
    return stats
