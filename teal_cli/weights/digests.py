"""The one file-hash cache: sha256 digests of weight files, each file hashed once.

:func:`file_sha256` remembers a file's digest by (absolute path, size, mtime, ctime, inode)
in this process and in ``$TEAL_CACHE_DIR/digests.json``, so a checkpoint, a feature
extractor's weights, a downloaded hub file or a base LLM's shards are read in full once.
On it: :func:`files_sha256` (several shards as one digest), :func:`weights_id` (the short
id token segments carry) and :func:`weights_sha256` (a Hugging Face model folder's digest).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

from ..errors import CodecError
from ..runtime.files import write_atomic

WEIGHTS_ID_LENGTH = 16  # hex digits of a sha256 kept in token segments
_CHUNK = 1 << 20


_DIGESTS: dict[tuple, str] = {}


def _digest_cache() -> Path:
    from .hub import cache_dir

    return cache_dir() / "digests.json"


def sha256sum(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB chunks (no caching)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file, remembered by (absolute path, size, mtime, ctime,
    inode) in this process and in ``$TEAL_CACHE_DIR/digests.json``, so a 1 GB checkpoint is
    hashed once; a file rewritten or replaced in place changes its inode or ctime. A link
    into a Hugging Face cache's ``blobs/`` folder needs no hashing: huggingface_hub names
    those blobs by their sha256 and checks it on download.

    Raises:
        CodecError: the file cannot be read.
    """
    path = Path(path)
    if path.is_symlink():
        real = path.resolve()
        if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
            return real.name
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    except OSError as exc:
        raise CodecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if key in _DIGESTS:
        return _DIGESTS[key]
    cache = _digest_cache()
    stamp = " ".join(str(v) for v in key[1:])
    stored: dict[str, Any] = {}
    try:
        stored = json.loads(cache.read_text())
        entry = stored.get(key[0]) if isinstance(stored, dict) else None
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp:
            _DIGESTS[key] = str(entry[1])
            return _DIGESTS[key]
    except (OSError, ValueError):
        stored = {}
    try:
        digest = sha256sum(path)
    except OSError as exc:
        raise CodecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    _DIGESTS[key] = digest
    if path.stat().st_size >= 1 << 20:  # small files are hashed faster than the cache is read
        try:
            stored = stored if isinstance(stored, dict) else {}
            stored[key[0]] = [stamp, digest]
            write_atomic(cache, json.dumps(stored))
        except OSError:
            pass  # a read-only cache only costs the hash again next time
    return digest


def files_sha256(files: Iterable[str | Path]) -> str:
    """One file's sha256; for several (shards), the sha256 of their digests joined by spaces."""
    digests = [file_sha256(f) for f in files]
    if not digests:
        return ""
    return digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()


def weights_id(*digests: str) -> str:
    """The short weights id token segments carry: the first 16 hex digits of a sha256 (one
    digest), or of the sha256 of several digests joined by spaces."""
    parts = [d for d in digests if d]
    if not parts:
        return ""
    full = parts[0] if len(parts) == 1 else hashlib.sha256(" ".join(parts).encode()).hexdigest()
    return full[:WEIGHTS_ID_LENGTH]


def weights_sha256(files: Iterable[str | Path]) -> str:
    """One digest for a model's weights: sha256 over ``"<file sha256>  <file name>\\n"`` lines,
    sorted by name (``sha256sum <weight files> | sha256sum`` in the model folder)."""
    paths = sorted((Path(f) for f in files), key=lambda p: p.name)
    return hashlib.sha256("".join(f"{file_sha256(f)}  {f.name}\n" for f in paths).encode()).hexdigest()
