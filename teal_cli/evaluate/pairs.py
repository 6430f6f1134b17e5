"""References and predictions: reading them, telling prompts from targets, matching by id.

Reference records hold the prompt segments and one or more target segments, by the rule
``teal train`` and ``teal generate`` follow too: a segment may carry ``"role": "prompt"`` or
``"role": "target"``; when no segment says ``target``, the last segment is the target and the
others the prompt. Several text targets are several references (captions).

Prediction records are what ``teal generate`` writes: the generated segments. Segments
marked ``"role": "prompt"`` (an echoed prompt) are left out; every other segment is the
prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..errors import DataError, UsageError
from ..records import Record, Segment, read_records

ROLES = ("prompt", "target")


def _role(seg: Segment, record: Record, index: int) -> str | None:
    role = seg.extra.get("role")
    if role is not None and role not in ROLES:
        raise DataError(f"record '{record.id}' segment {index}: 'role' must be prompt or target, got {role!r}")
    return role


def split_roles(record: Record) -> tuple[list[Segment], list[Segment]]:
    """``(prompt segments, target segments)`` of a reference record, in order: the same rule
    as the model's ``segment_role`` (when any segment has a role, unmarked ones are prompt;
    when none has, the last segment is the target)."""
    roles = [_role(s, record, i) for i, s in enumerate(record.segments)]
    if all(r is None for r in roles):
        roles = ["prompt"] * (len(roles) - 1) + ["target"] if roles else []
    prompt = [s for s, r in zip(record.segments, roles) if r != "target"]
    target = [s for s, r in zip(record.segments, roles) if r == "target"]
    return prompt, target


def predicted_segments(record: Record) -> list[Segment]:
    """The segments of a prediction record that are the prediction (not an echoed prompt)."""
    return [s for i, s in enumerate(record.segments) if _role(s, record, i) != "prompt"]


def text_of(segments: Iterable[Segment]) -> str:
    """The text segments joined by single spaces."""
    return " ".join(s.text.strip() for s in segments if s.modality == "text" and s.text is not None).strip()


def read_file(path: str) -> list[Record]:
    """All records of a JSONL file (``-`` is stdin); errors name ``path:line``."""
    import sys

    if path == "-":
        return list(read_records(sys.stdin.buffer, "<stdin>"))
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    with open(p, "rb") as f:
        return list(read_records(f, path))


@dataclass
class MatchStats:
    """What matching predictions to references found."""

    references: int = 0
    predictions: int = 0
    missing: list[str] = field(default_factory=list)  # reference ids without a prediction
    extra: list[str] = field(default_factory=list)  # prediction ids without a reference
    duplicates: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # records skipped by a scorer (messages)

    @property
    def skipped(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.duplicates) + len(self.bad)

    def counts(self, scored: int) -> dict[str, int]:
        return {"references": self.references, "predictions": self.predictions, "scored": scored,
                "missing": len(self.missing), "extra": len(self.extra), "duplicates": len(self.duplicates),
                "bad": len(self.bad)}


def _index(records: list[Record], name: str, on_error: str, stats: MatchStats, warn) -> dict[str, Record]:
    out: dict[str, Record] = {}
    for record in records:
        if record.id in out:
            message = f"{name}: id '{record.id}' appears more than once; ids must be unique"
            if on_error == "fail":
                raise DataError(message)
            stats.duplicates.append(record.id)
            warn(f"skipped: {message} (kept the first)")
            continue
        out[record.id] = record
    return out


def match(references: list[Record], predictions: list[Record], ref_name: str, pred_name: str,
          on_error: str = "fail", warn: Callable[[str], None] | None = None,
          stats: MatchStats | None = None) -> tuple[list[tuple[Record, Record]], MatchStats]:
    """Pair each reference with the prediction of the same id, in reference order.

    A reference without a prediction, a prediction without a reference, or an id seen twice
    in one file raises a :class:`DataError` naming the id and the file; with
    ``on_error="skip"`` each is reported through ``warn``, counted in the stats and left out.
    """
    warn = warn or (lambda message: None)
    stats = stats if stats is not None else MatchStats()
    stats.references, stats.predictions = len(references), len(predictions)
    refs = _index(references, ref_name, on_error, stats, warn)
    preds = _index(predictions, pred_name, on_error, stats, warn)
    pairs = []
    for rid, ref in refs.items():
        pred = preds.get(rid)
        if pred is None:
            message = f"{pred_name}: no prediction for id '{rid}' of {ref_name}"
            if on_error == "fail":
                raise DataError(message + " (every reference needs one; --on-error skip leaves it out)")
            stats.missing.append(rid)
            warn(f"skipped: {message}")
            continue
        pairs.append((ref, pred))
    for pid in preds:
        if pid not in refs:
            message = f"{pred_name}: prediction id '{pid}' has no reference in {ref_name}"
            if on_error == "fail":
                raise DataError(message + " (--on-error skip leaves it out)")
            stats.extra.append(pid)
            warn(f"skipped: {message}")
    return pairs, stats
