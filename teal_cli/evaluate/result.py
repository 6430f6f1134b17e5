"""What an evaluation returns: metrics, counts, settings, and what the report draws."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def nothing_to_score(task: str, where: str, counts: dict[str, int] | None = None) -> None:
    """Raise DataError: a metric over an empty set is no number (accuracy, WER or perplexity
    of nothing would read as a result). ``counts`` say what was read and skipped."""
    from ..errors import DataError

    seen = ""
    if counts:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        seen = f" ({shown})" if shown else ""
    raise DataError(f"{where}: nothing to score for {task}{seen}; every metric needs at least one scored item")


@dataclass
class EvalResult:
    """One task's scores.

    Attributes:
        task: the task name (``caption``, ``mcq``...).
        metrics: metric name -> value (the scales each scorer documents).
        counts: ``references``, ``predictions``, ``scored`` and what was skipped.
        settings: what the numbers depend on (normalisations, signatures, seeds).
        per_category: category (or class) -> ``{"accuracy": .., "count": ..}``, when the task has them.
        confusion: ``{"labels": [...], "matrix": [[...]]}`` (rows: truth, columns: predicted).
        figures: material for ``--report`` only (images, curves); never in the JSON.
    """

    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    per_category: dict[str, dict[str, float]] | None = None
    confusion: dict[str, Any] | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "metrics": _finite(self.metrics), "counts": self.counts,
                               "settings": self.settings}
        if self.per_category is not None:
            out["per_category"] = _finite(self.per_category)
        if self.confusion is not None:
            out["confusion"] = self.confusion
        return out


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def per_category(items: list[tuple[str, bool]]) -> dict[str, dict[str, float]]:
    """``(category, correct)`` pairs to ``category -> {"accuracy", "count"}``, sorted by name."""
    groups: dict[str, list[bool]] = {}
    for cat, ok in items:
        groups.setdefault(cat, []).append(ok)
    return {cat: {"accuracy": sum(v) / len(v), "count": len(v)} for cat, v in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}


def _sort_key(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def sort_labels(labels: list[str]) -> list[str]:
    """Numerals first in numeric order, then the rest alphabetically."""
    return sorted(set(labels), key=_sort_key)
