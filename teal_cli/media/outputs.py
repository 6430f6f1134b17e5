"""Output naming shared by commands that write one file per record or segment.

``-o`` is one of: a file; a folder (an existing directory, or a path ending in ``/``),
written as ``<folder>/<id>[-<n>].<ext>``; or a pattern with ``{id}`` (and optionally
``{n}``, a segment's index among its record's media, and ``{modality}``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .io import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, modality_of

DEFAULT_EXTENSION = {"image": ".png", "audio": ".wav"}


def safe_id(record_id: str) -> str:
    """A record id as a file name: media extension dropped, separators and oddities replaced."""
    stem = record_id
    root, ext = os.path.splitext(stem)
    if ext.lower() in IMAGE_EXTENSIONS | AUDIO_EXTENSIONS:
        stem = root
    stem = re.sub(r"[^\w.\-]+", "_", stem).strip("._") or "record"
    return stem


@dataclass
class OutputTarget:
    """Where per-record outputs go: one file, a folder, or a pattern with ``{id}``.

    ``extension`` fixes the file type (``.jsonl`` for records); None means media files whose
    default extension follows the segment's modality.
    """

    spec: str
    extension: str | None = None
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.spec:
            raise UsageError("-o/--output is empty")
        if "{id}" in self.spec:
            self.kind = "pattern"
        elif self.spec.endswith(("/", os.sep)) or Path(self.spec).is_dir():
            self.kind = "folder"
        else:
            self.kind = "file"
            if self.extension is None and modality_of(self.spec) is None:
                raise UsageError(f"-o {self.spec}: expected a .png/.wav (or other image/audio) file, a folder, or a pattern with {{id}}")

    def path_for(self, record_id: str, n: int, multi: bool, modality: str) -> Path:
        ext = self.extension or DEFAULT_EXTENSION[modality]
        if self.kind == "folder":
            name = safe_id(record_id) + (f"-{n}" if multi else "") + ext
            return Path(self.spec) / name
        if self.kind == "pattern":
            try:
                text = self.spec.format(id=safe_id(record_id), n=n, modality=modality)
            except (KeyError, IndexError, ValueError) as exc:
                raise UsageError(f"-o {self.spec}: bad pattern ({exc}); use {{id}}, {{n}} and {{modality}}") from None
            path = Path(text)
            if multi and "{n}" not in self.spec:
                path = path.with_name(f"{path.stem}-{n}{path.suffix}")
            if not path.suffix:
                path = path.with_suffix(ext)
            return path
        return Path(self.spec)


