"""One training run per model directory: an advisory lock on ``DIR/.train.lock``.

Two ``teal train`` runs on one directory would interleave ``metrics.jsonl`` and overwrite
each other's checkpoints and result, so a run holds ``fcntl.flock`` on the lock file for its
whole life and the second one refuses, naming the holder (pid, host, start time) that the
file records. The kernel drops the lock when its process dies (kill -9 included), so a lock
left by a dead process is simply taken over: the file's content is information, never the
lock itself (no check-then-create race). The holder removes the file when it is done, after
making sure it still owns the path (a waiter that opened the old file retries on the new one).

Across machines this relies on the file system supporting flock (Linux NFS maps it to NFS
locks; Lustre needs its ``flock`` mount option); where it is refused the run says so and stops.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from pathlib import Path

from ..errors import TealError, UsageError

LOCK_NAME = ".train.lock"


class DirectoryBusy(TealError):
    """Another process is training (or replacing) this model directory."""


def holder(path: Path) -> str:
    """Who the lock file says holds it, in words (or a plain phrase when it cannot be read)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class TrainLock:
    """``with TrainLock(directory):`` holds the directory's training lock or raises DirectoryBusy.

    ``what`` words the refusal (``train`` or ``replace``). Raises UsageError when the lock file
    cannot be created (the directory is not writable) or the file system has no locks."""

    def __init__(self, directory: str | Path, what: str = "train"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> "TrainLock":
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UsageError(f"{self.directory}: cannot {self.what} here: cannot create {self.path.name} "
                                 f"({exc.strerror}); the model directory must be writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise DirectoryBusy(f"{self.directory} is being trained by {holder(self.path)}; wait for that run "
                                        f"to end or stop it (its lock: {self.path})") from None
                raise UsageError(f"{self.path}: cannot lock ({exc.strerror}); this file system does not support "
                                 "file locks: train on a local or lock-capable file system") from None
            # The previous holder may have removed the file between our open and our lock:
            # then we locked an orphan inode and must retry on the file now at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened it retries (see __enter__)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def check_not_busy(directory: str | Path, what: str) -> None:
    """Raise DirectoryBusy when a run holds ``directory``'s training lock (no lock is kept)."""
    if (Path(directory) / LOCK_NAME).exists():
        with TrainLock(directory, what):
            pass
