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




# --------------------------------------------------------------------------- checked before any work


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _check_creatable(path: Path, option: str, what: str) -> None:
    """``path`` (absent) can be made: its nearest existing ancestor is a writable folder."""
    base = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not base.is_dir():
        raise UsageError(f"{option} {path}: {base} is a file, not a folder; the {what} cannot be written there")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder {base} is not writable")


def check_output_file(path: str | Path | None, option: str = "-o") -> None:
    """Raise UsageError unless ``path`` (None or ``-``: stdout) can be written as a file:
    not a folder, not under a file, in a writable folder. Commands call it before any work,
    so a bad path never costs a run's results."""
    if path is None or str(path) == "-":
        return
    if not str(path):
        raise UsageError(f"{option} is empty")
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a folder; expected a file name")
    if os.path.lexists(p):
        if not os.access(p.parent if str(p.parent) else ".", os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path}: the folder {p.parent} is not writable (the file is replaced atomically)")
        return
    _check_creatable(p, option, "file")


def check_output_folder(path: str | Path | None, option: str) -> None:
    """Raise UsageError unless ``path`` is a writable folder or can be made as one."""
    if path is None:
        return
    if not str(path):
        raise UsageError(f"{option} is empty")
    p = Path(path)
    if os.path.lexists(p):
        if not p.is_dir():
            raise UsageError(f"{option} {path}: is a file; expected a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path}: the folder is not writable")
        return
    _check_creatable(p, option, "folder")


def check_output_target(target: OutputTarget, option: str = "-o") -> None:
    """:func:`check_output_file` / :func:`check_output_folder` for a file, a folder, or the
    fixed folder part of a pattern (what precedes the first ``{...}``)."""
    if target.kind == "file":
        check_output_file(target.spec, option)
    elif target.kind == "folder":
        check_output_folder(target.spec, option)
    else:
        fixed = []
        for part in Path(target.spec).parent.parts:
            if "{" in part:
                break
            fixed.append(part)
        if fixed:
            check_output_folder(Path(*fixed), option)
