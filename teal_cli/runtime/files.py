"""Writing files and folders atomically: a temp name beside the target, renamed onto it.

A reader sees the old file or the new one, never half of one; a failed or interrupted
write leaves neither a partial file nor the temp file behind. Every writer in teal goes
through :func:`atomic_output` / :func:`write_atomic` (files) or :func:`temp_dir_beside`
(folders written whole, then renamed; :func:`apply_umask` before the rename).

``tempfile.mkstemp`` creates its file 0600 and ``mkdtemp`` its folder 0700, and a rename
keeps those modes; so the temp file or folder is given the mode a plain ``open()`` or
``mkdir()`` would have had (``0666`` / ``0777`` less the umask) before it takes the final
name. Files that libraries write 0600 themselves get the same treatment (:func:`apply_umask`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, so only as a fallback)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0666`` less the umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: ``0777`` less the umask."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def atomic_output(path: str | Path, *, binary: bool = False) -> Iterator[IO]:
    """Open a temp file beside ``path`` (creating missing parent folders); rename it onto
    ``path`` only if the block succeeds. Text is written as UTF-8."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_output(path, binary=isinstance(data, bytes)) as f:
        f.write(data)


def temp_dir_beside(path: str | Path) -> Path:
    """A new empty folder ``.<name>.<random>`` beside ``path``, with the mode ``mkdir`` would
    give it: fill it, then ``os.replace`` it onto ``path``. The caller removes it on failure
    (``shutil.rmtree``)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(dir_mode())
    return tmp


def replace_dir(tmp: str | Path, path: str | Path) -> None:
    """Move the finished folder ``tmp`` (from :func:`temp_dir_beside`) onto ``path``, replacing
    a folder there: two renames, so a crash between them leaves the old one beside under a
    hidden name rather than half of each; the old one is removed last. Raises OSError."""
    import shutil

    tmp, path = Path(tmp), Path(path)
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    os.replace(path, old / "x")
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and the files directly in it) the mode a plain
    ``open()`` / ``mkdir()`` would have: ``safetensors.save_file`` and transformers'
    ``save_pretrained`` write their files 0600 (a temp file renamed), too private for a
    shared model or cache folder."""
    path = Path(path)
    if path.is_dir():
        path.chmod(dir_mode())
        mode = file_mode()
        for f in path.iterdir():
            if f.is_file() and not f.is_symlink():
                f.chmod(mode)
    else:
        path.chmod(file_mode())


def cache_dir() -> Path:
    """Root of teal's cache."""
    env = os.environ.get("TEAL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "teal"
