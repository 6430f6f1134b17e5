"""Named checkpoint files: official URLs with sha256, a local cache, resumable downloads.

``fetch(HubFile(...))`` returns a verified local path. The cache is ``$TEAL_CACHE_DIR``
(default ``~/.cache/teal``); files live at ``<cache>/<subdir>/<filename>``. With
``TEAL_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) nothing is downloaded, and a missing file is an
error that names the URL to fetch and the exact path to place it at.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import DownloadError
from ..runtime.quiet import Progress
from ..runtime.files import cache_dir  # noqa: F401  (re-exported: weights live in the cache)
from .digests import file_sha256, sha256sum

_CHUNK = 1 << 20
# Used when fetch() gets no progress callback; the CLI installs a progress bar here.
default_progress: Progress | None = None


@dataclass(frozen=True)
class HubFile:
    """One downloadable file.

    Attributes:
        url: the official download address.
        sha256: expected hex digest, or a prefix of it (torch.hub's convention of naming files
            with the first 8+ hex digits); empty means "not pinned" (verified against nothing).
        subdir: cache sub-folder, e.g. ``"vqgan-f16-16384"``.
        filename: name in the cache; defaults to the URL's last path component.
    """

    url: str
    sha256: str
    subdir: str
    filename: str = ""

    @property
    def name(self) -> str:
        return self.filename or self.url.rstrip("/").rsplit("/", 1)[-1]


def offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").lower() in truthy for v in ("TEAL_OFFLINE", "HF_HUB_OFFLINE"))


def cached_path(file: HubFile) -> Path:
    return cache_dir() / file.subdir / file.name


def _verify(path: Path, file: HubFile) -> None:
    """Check the digest (:func:`~teal_cli.weights.digests.file_sha256` caches it, so an
    unchanged file is read once)."""
    if not file.sha256:
        return
    actual = file_sha256(path)
    if not actual.startswith(file.sha256):
        raise DownloadError(
            f"{path}: sha256 is {actual}, expected {_expected(file)} for {file.url}; delete the file and download it again"
        )


def _expected(file: HubFile) -> str:
    return file.sha256 if len(file.sha256) == 64 else f"one starting with {file.sha256}"


def fetch(file: HubFile, *, progress: Progress | None = None) -> Path:
    """Return the cached, verified path of ``file``, downloading it first if needed
    (``progress(done_bytes, total_bytes_or_None)`` is told how far the download is).

    Downloads resume from a ``.part`` file left by an interrupted run.
    """
    path = cached_path(file)
    if path.is_file():
        _verify(path, file)
        return path
    if offline():
        raise DownloadError(
            f"{file.name} is not in the cache and offline mode is on: download {file.url} and place it at {path} "
            "(or pass a local --checkpoint)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        _download(file.url, part, progress or default_progress)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot download {file.url} ({reason}): download it by hand and place it at {path} "
            "(or pass a local --checkpoint)"
        ) from None
    if file.sha256:
        actual = sha256sum(part)
        if not actual.startswith(file.sha256):
            part.unlink()
            raise DownloadError(f"{file.url}: downloaded file has sha256 {actual}, expected {_expected(file)}; not kept")
    os.replace(part, path)
    _verify(path, file)
    return path


def _download(url: str, part: Path, progress: Progress | None) -> None:
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "teal"})
    if done:
        request.add_header("Range", f"bytes={done}-")
    with urllib.request.urlopen(request, timeout=60) as response:
        if done and response.status != 206:  # server ignored the range: start over
            done = 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else None
        with open(part, "ab" if done else "wb") as out:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
