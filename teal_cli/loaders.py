"""Loader pools: media files decoded and preprocessed ahead of the encoder.

Threads suit audio (soundfile and soxr release the GIL, and waveforms are big to copy) and
small machines. Image decoding also releases the GIL, but PIL's Python-level parsing and
the hand-offs between many threads do not scale: on a 16-core GPU host 16 threads reached
914 images/s and 16 spawned processes 1,303 (decode + 256 px Lanczos resize + crop, uint8
out). So images go to processes once there are ``PROCESS_MIN_WORKERS`` workers or more;
with 4 workers threads were as fast or faster. Workers come from a fork server (the parent
itself is never forked: it may hold CUDA state and threads) that has preloaded only what a
loader needs (PIL, numpy, teal_cli.pixels), so they start in milliseconds without importing
torch or the caller's ``__main__``. They return uint8 arrays, a quarter of the bytes of
float pixels; the value mapping runs afterwards on the encoder's device.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from .errors import UsageError

LOADERS = ("auto", "threads", "processes")
PRELOAD = ["numpy", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "teal_cli.media", "teal_cli.pixels"]
PROCESS_MIN_WORKERS = 8
MAX_DEFAULT_WORKERS = 16
PROCESS_AFTER = 128  # image jobs run on threads while the processes start (see Loaders)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """One loader per usable core, at most 16."""
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cpus()))


def resolve_loader(kind: str, workers: int) -> str:
    """``auto``: processes from ``PROCESS_MIN_WORKERS`` workers up, else threads."""
    if kind not in LOADERS:
        raise UsageError(f"--loader {kind}: expected one of {', '.join(LOADERS)}")
    if kind == "auto":
        return "processes" if workers >= PROCESS_MIN_WORKERS else "threads"
    return kind


def _ready() -> bool:
    return True


def _quiet_worker() -> None:
    """Loader processes leave Ctrl-C to the parent, which shuts them down."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Loaders:
    """A thread pool for audio (and images, with ``threads``) plus, with ``processes``, a pool
    of loader processes for images. Use as a context manager; one instance can serve many
    ``tokenize_records`` calls.

    Starting the processes costs little (8 workers: 0.16 s on a 2-core machine), plus what the
    calling script costs to import: multiprocessing re-imports it in every worker (as
    ``__mp_main__``), cheap for the ``teal`` command, seconds for one that imports torch at
    the top. So they are not started for a handful of images: the first ``PROCESS_AFTER``
    image jobs run on the threads while the pool starts in the background, and later jobs go
    to the processes once every one of them is up. :meth:`start` starts them at once instead.
    """

    def __init__(self, workers: int | None = None, kind: str = "auto"):
        self.workers = default_workers() if workers is None else workers
        if self.workers < 1:
            raise UsageError(f"--workers {workers}: must be >= 1")
        self.kind = resolve_loader(kind, self.workers)
        self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="teal-load")
        self._processes = None
        self._ready = threading.Event()
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._image_jobs = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a loader thread."""
        return self._threads.submit(fn, *args)

    def submit_image(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run an image job (a torch-free, picklable module-level ``fn``) on the image pool."""
        if self.kind == "processes":
            if self._ready.is_set():
                return self._processes.submit(fn, *args)
            self._image_jobs += 1
            if self._starter is None and self._image_jobs >= PROCESS_AFTER:
                self._starter = threading.Thread(target=self._start_quietly, name="teal-loader-start", daemon=True)
                self._starter.start()
        return self._threads.submit(fn, *args)

    @property
    def using_processes(self) -> bool:
        """Whether image jobs now go to the processes."""
        return self._ready.is_set()

    def start(self) -> "Loaders":
        """Start every loader process now (with ``processes``), and wait until they are up."""
        if self.kind == "processes" and not self._ready.is_set():
            if self._starter is not None:
                self._starter.join()
                if self._start_error is not None:
                    raise self._start_error
            else:
                self._start_processes()
        return self

    def _start_processes(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self._processes = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_quiet_worker)
        for job in [self._processes.submit(_ready) for _ in range(self.workers)]:
            job.result()
        self._ready.set()

    def _start_quietly(self) -> None:
        # In the background: if the processes cannot start (no forkserver on this platform,
        # resource limits), the images simply stay on the threads.
        try:
            self._start_processes()
        except BaseException as exc:  # noqa: BLE001 (reported through start() when asked)
            self._start_error = exc

    def close(self) -> None:
        if self._starter is not None:
            self._starter.join()
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Loaders":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
