"""Token records, version 1: the JSONL format every teal subcommand reads and writes.

One JSON object per line is one example, an ordered list of segments::

    {"v": 1, "id": "cat.png", "segments": [
      {"modality": "image", "codec": "patch-p4-k512", "shape": [16, 16], "tokens": [5, 901, ...]},
      {"modality": "text", "text": "A cat on a mat."}]}

Token ids are codec-local (``0 <= id < vocab_size``). A segment carries what a decoder needs
to invert it (``codec``, ``shape``, ``frame_rate``, ``durations``) and which exact weights
made it (``weights``: 16 hex digits of the checkpoint's sha256, see
:func:`teal_cli.codecs.base.check_segment_weights`; optional, absent in older records). Readers reject a newer
``v`` and keep unknown keys so that records pass through teal unchanged.

Manifests use the same reader: a record without ``segments`` names media by path
(``{"id": "a", "image": "a.png", "text": "a cat"}``); :func:`manifest_segments` turns its keys,
in order, into segments whose ``path`` is still to be tokenized.

Reading and writing stream line by line, so memory is constant in file size.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import IO, Any, Iterable, Iterator

from .errors import DataError

RECORD_VERSION = 1
MODALITIES = ("text", "image", "audio")
MEDIA_MODALITIES = ("image", "audio")

_SEGMENT_KEYS = ("modality", "codec", "weights", "shape", "frame_rate", "tokens", "durations", "text", "path")
_WEIGHTS = re.compile(r"[0-9a-f]{8,64}")
_RECORD_KEYS = ("v", "id", "segments")


@dataclass
class Segment:
    """One run of a single modality: text, or the token ids of one image/audio clip.

    ``path`` is set only on media that is still to be tokenized (manifests). ``weights`` is
    the codec's :attr:`~teal_cli.codecs.base.Codec.weights_id` when the tokens were made (16
    hex digits of a sha256; absent in records from before teal wrote it).
    """

    modality: str
    text: str | None = None
    codec: str | None = None
    weights: str | None = None
    tokens: list[int] | None = None
    shape: list[int] | None = None
    frame_rate: float | None = None
    durations: list[int] | None = None
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_role(self, role: str) -> "Segment":
        """A copy with ``extra["role"] = role`` and every other field kept (``weights`` included:
        a copy that drops it would let ids of other codec weights through)."""
        return replace(self, extra={**self.extra, "role": role})

    @property
    def is_tokens(self) -> bool:
        return self.modality in MEDIA_MODALITIES and self.tokens is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"modality": self.modality}
        for key in _SEGMENT_KEYS[1:]:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out


@dataclass
class Record:
    """One example: an id and its ordered segments. Unknown top-level keys live in ``extra``."""

    id: str
    segments: list[Segment]
    v: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": RECORD_VERSION, "id": self.id, "segments": [s.to_json() for s in self.segments]}
        out.update(self.extra)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(", ", ": "), allow_nan=False)


# --------------------------------------------------------------------------- validation


def _fail(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}")


def _expect_int_list(value: Any, where: str, name: str, *, minimum: int | None = None) -> list[int]:
    if not isinstance(value, list):
        raise _fail(where, f"field '{name}': expected a list of integers, got {type(value).__name__}")
    for i, item in enumerate(value):
        # bool is an int subclass in Python; true/false in a token list is a mistake.
        if not isinstance(item, int) or isinstance(item, bool):
            raise _fail(where, f"field '{name}[{i}]': expected an integer, got {json.dumps(item)}")
        if minimum is not None and item < minimum:
            raise _fail(where, f"field '{name}[{i}]': expected an integer >= {minimum}, got {item}")
    return value


def parse_segment(obj: Any, where: str, index: int) -> Segment:
    """Validate one segment object; errors name ``where`` and ``segments[index].field``."""
    pre = f"segments[{index}]"
    if not isinstance(obj, dict):
        raise _fail(where, f"field '{pre}': expected an object, got {type(obj).__name__}")
    modality = obj.get("modality")
    if modality not in MODALITIES:
        raise _fail(where, f"field '{pre}.modality': expected one of {', '.join(MODALITIES)}, got {json.dumps(modality)}")
    seg = Segment(modality=modality, extra={k: v for k, v in obj.items() if k not in _SEGMENT_KEYS})
    if modality == "text":
        text = obj.get("text")
        if not isinstance(text, str):
            raise _fail(where, f"field '{pre}.text': expected a string, got {json.dumps(text)}")
        seg.text = text
        return seg
    path = obj.get("path")
    if path is not None and not isinstance(path, str):
        raise _fail(where, f"field '{pre}.path': expected a string, got {json.dumps(path)}")
    seg.path = path
    if "tokens" not in obj:
        if path is None:
            raise _fail(where, f"field '{pre}.tokens': missing (a {modality} segment needs 'tokens', or 'path' to tokenize)")
        return seg
    seg.tokens = _expect_int_list(obj["tokens"], where, f"{pre}.tokens", minimum=0)
    codec = obj.get("codec")
    if not isinstance(codec, str) or not codec:
        raise _fail(where, f"field '{pre}.codec': expected the codec name as a string, got {json.dumps(codec)}")
    seg.codec = codec
    if "weights" in obj:
        weights = obj["weights"]
        if not isinstance(weights, str) or not _WEIGHTS.fullmatch(weights):
            raise _fail(where, f"field '{pre}.weights': expected the codec's weights id (8 to 64 lowercase hex digits), "
                               f"got {json.dumps(weights)[:80]}")
        seg.weights = weights
    if "shape" in obj:
        shape = _expect_int_list(obj["shape"], where, f"{pre}.shape", minimum=1)
        if math.prod(shape) != len(seg.tokens):
            raise _fail(where, f"field '{pre}.shape': {shape} holds {math.prod(shape)} tokens but 'tokens' has {len(seg.tokens)}")
        seg.shape = shape
    if "frame_rate" in obj:
        rate = obj["frame_rate"]
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
            raise _fail(where, f"field '{pre}.frame_rate': expected a positive number, got {json.dumps(rate)}")
        seg.frame_rate = rate
    if "durations" in obj:
        durations = _expect_int_list(obj["durations"], where, f"{pre}.durations", minimum=1)
        if len(durations) != len(seg.tokens):
            raise _fail(where, f"field '{pre}.durations': {len(durations)} entries for {len(seg.tokens)} tokens")
        seg.durations = durations
    return seg


def parse_record(obj: Any, where: str) -> Record:
    """Validate a decoded JSON object as a token record or a manifest entry."""
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object per line, got {type(obj).__name__}")
    version = obj.get("v", RECORD_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(where, f"field 'v': expected a positive integer version, got {json.dumps(version)}")
    if version > RECORD_VERSION:
        raise _fail(where, f"field 'v': record version {version} is newer than this teal reads ({RECORD_VERSION}); upgrade teal")
    rid = obj.get("id")
    if rid is None:
        raise _fail(where, "field 'id': missing")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise _fail(where, f"field 'id': expected a string, got {json.dumps(rid)}")
    rid = str(rid)
    if "segments" not in obj:
        # A flat manifest's other keys (label, task, ...) are the record's, kept like any unknown key.
        extra = {k: v for k, v in obj.items() if k not in _RECORD_KEYS and k not in MODALITIES}
        return Record(id=rid, segments=manifest_segments(obj, where), extra=extra)
    raw = obj["segments"]
    if not isinstance(raw, list):
        raise _fail(where, f"field 'segments': expected a list, got {type(raw).__name__}")
    segments = [parse_segment(s, where, i) for i, s in enumerate(raw)]
    extra = {k: v for k, v in obj.items() if k not in _RECORD_KEYS}
    return Record(id=rid, segments=segments, extra=extra)


def manifest_segments(obj: dict[str, Any], where: str) -> list[Segment]:
    """Segments of a manifest entry: ``image``/``audio`` paths and ``text``, in key order.

    A value may be a list, for several items of one modality. Other keys are the record's
    (:func:`parse_record` keeps them in ``Record.extra``).
    """
    segments: list[Segment] = []
    for key, value in obj.items():
        if key not in MODALITIES:
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, str):
                raise _fail(where, f"field '{key}': expected a {'string' if key == 'text' else 'path string'}, got {json.dumps(item)}")
            segments.append(Segment(modality="text", text=item) if key == "text" else Segment(modality=key, path=item))
    if not segments:
        raise _fail(where, "record has no 'segments' and no 'image', 'audio' or 'text' field")
    return segments


# --------------------------------------------------------------------------- streaming I/O


def _no_constant(name: str) -> float:
    # NaN and Infinity are not JSON; Python's json reads them, and a record holding one cannot be
    # written back (allow_nan=False) nor mean anything as a label or a rate.
    raise ValueError(f"invalid JSON ({name} is not a JSON number; write a finite number, or a string)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"invalid JSON (the number {text[:40]} overflows a 64-bit float)")
    return value


def read_records(stream: IO[str] | IO[bytes], name: str = "<stdin>") -> Iterator[Record]:
    """Yield records from a JSONL stream (text or binary) one line at a time. Blank lines are skipped.

    Errors are :class:`DataError` naming ``name:line``.
    """
    for lineno, line in enumerate(stream, 1):
        if isinstance(line, bytes):
            # Binary streams are decoded line by line so that an error names its line.
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _fail(f"{name}:{lineno}", f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)") from None
        if lineno == 1:
            line = line.lstrip("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            raise _fail(where, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        except ValueError as exc:
            raise _fail(where, str(exc)) from None
        yield parse_record(obj, where)


class RecordWriter:
    """Write records as JSONL, flushing after each so that downstream pipes see them at once."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.count = 0

    def write(self, record: Record) -> None:
        self.stream.write(record.dumps() + "\n")
        self.stream.flush()
        self.count += 1

    def write_all(self, records: Iterable[Record]) -> int:
        for record in records:
            self.write(record)
        return self.count
