"""Loaders: media files decoded and preprocessed ahead of the encoder.

Audio, and images with ``--loader threads``, go to a thread pool: soundfile, soxr and PIL
release the GIL, and waveforms are big to copy. With ``processes`` images go to the worker
processes of a persistent ``torch.utils.data.DataLoader`` (several images per job, uint8
tensors back through shared memory, results in job order). Processes pay off only with many workers (a 16-core GPU host decoded 1,303 images/s with 16
processes, 914 with 16 threads), so ``auto`` takes them from ``PROCESS_MIN_WORKERS`` up.
Workers fork from a fork server that preloaded what they need (the parent, which may hold
CUDA state and threads, is never forked), run below the parent's priority (``LOADER_NICE``)
so that the process feeding the GPU is not the one that waits, leave Ctrl-C to the parent
(which shuts them down) and exit when it dies.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..runtime.cpus import cgroup_cpu_quota, usable_cpus  # noqa: F401 (cgroup_cpu_quota: re-exported)
from ..errors import TealError, UsageError

if TYPE_CHECKING:
    import numpy as np

LOADERS = ("auto", "threads", "processes")
PRELOAD = ["numpy", "torch", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "teal_cli.media.io",
           "teal_cli.media.pixels", "teal_cli.pipeline.loaders"]
PROCESS_MIN_WORKERS = 8
PROCESS_AFTER = 128  # image jobs run on threads while the processes start (see Loaders)
MAX_DEFAULT_WORKERS = 16
CHUNK_MAX = 8  # images per process job: each job costs the parent the same whatever its size
PREFETCH = 16  # jobs in flight per worker at most; what is queued (two windows) is the real bound
LOADER_NICE = 5  # loader processes' priority below the parent's (os.nice increment)


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


def _quiet_worker(nice: int, parent: int, worker_id: int = 0) -> None:
    """A loader process's start (``worker_init_fn``): Ctrl-C is left to the parent, which shuts
    the workers down, and the CPU to the parent (``nice``); the worker exits when process
    ``parent`` is gone, even killed outright. (The DataLoader's own watchdog waits for its
    parent process to change, but that is the fork server, which lives as long as any worker.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:  # not permitted here: run at the parent's priority
            pass
    threading.Thread(target=_exit_with, args=(parent,), name="teal-parent-watch", daemon=True).start()


def _exit_with(pid: int) -> None:
    """Wait for process ``pid`` to end (a pidfd on Linux, else polling), then exit."""
    import select
    import time

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:  # the pid now belongs to another user's process
                break
    os._exit(0)


def load_image_job(prep, path: str) -> "tuple[np.ndarray, tuple[int, int] | None]":
    """One image for the encoder: ``(pixels [H, W, 3] uint8, content size or None)``
    (:meth:`~teal_cli.media.pixels.PixelPrep.apply`)."""
    from ..media.io import load_image
    from ..media.pixels import PixelPrep

    image = load_image(path)
    return prep.apply(image, path) if isinstance(prep, PixelPrep) else prep.apply(image)  # (other geometries: apply(image))


class _ImageJobs:
    """The DataLoader's dataset: its "index" is the job itself, ``(prep, paths)``. Returns
    ``(pixels, per path (row in pixels, content size or None) or the teal error of a bad
    file)`` (anything else fails the job, as a bug should). ``pixels`` is one tensor when the
    images share a shape (one shared-memory hand-over per job: each costs the parent a file
    descriptor's transfer), else a list."""

    def __getitem__(self, job: tuple) -> tuple:
        import numpy as np
        import torch

        prep, paths = job
        arrays, out = [], []
        for path in paths:
            try:
                pixels, size = load_image_job(prep, path)
            except TealError as exc:
                out.append(exc)
                continue
            out.append((len(arrays), size))
            arrays.append(pixels)
        if arrays and all(a.shape == arrays[0].shape for a in arrays):
            return torch.from_numpy(np.stack(arrays)), out
        return [torch.tensor(a) for a in arrays], out  # (copies: PIL's arrays are read-only)


def _one_job(batch: list) -> list:
    """``collate_fn``: every batch the DataLoader forms is one job."""
    return batch[0]


class _JobQueue:
    """The DataLoader's batch sampler: jobs in the order they were queued. Empty, it ends the
    DataLoader's pass; jobs queued later are taken up by the next pass (:meth:`Loaders._pull`)."""

    def __init__(self) -> None:
        self.jobs: deque = deque()

    def __iter__(self) -> "_JobQueue":
        return self

    def __next__(self) -> list:
        if not self.jobs:
            raise StopIteration
        return [self.jobs.popleft()]


class ImageLoads:
    """Images being loaded: :meth:`result` ``(i)`` gives ``(pixels [H, W, 3] uint8, content
    size or None)`` for the i-th path (:func:`load_image_job`), or raises its error. Pixels
    are numpy arrays from threads, torch tensors in shared memory from processes."""

    def __init__(self, count: int, futures: Sequence[Future] | None = None, pull: Callable[[], None] | None = None):
        self._futures = futures
        self._pull = pull
        self._out: list[Any] = [None] * count

    def __len__(self) -> int:
        return len(self._out)

    def result(self, i: int) -> tuple:
        """Image ``i``'s ``(pixels, content size or None)``, waiting for it."""
        if self._futures is not None:
            return self._futures[i].result()
        while self._out[i] is None:
            self._pull()
        if isinstance(self._out[i], BaseException):
            raise self._out[i]
        return self._out[i]


class Loaders:
    """A thread pool for audio (and images, with ``threads``) plus, with ``processes``, the
    DataLoader's worker processes for images. Use as a context manager; one instance can
    serve many ``tokenize_records`` calls, from one thread (results are taken in the order
    the loads were started).

    Starting the processes costs seconds (their fork server imports torch: 8 workers took
    7 s on a loaded 2-core machine), so they are not started for a handful of images: the
    first ``PROCESS_AFTER`` images load on the threads while the processes start in the
    background, and later ones go to the processes once they are up. :meth:`start` starts
    them at once instead."""

    def __init__(self, workers: int | None = None, kind: str = "auto", nice: int = LOADER_NICE):
        self.workers = default_workers() if workers is None else workers
        if self.workers < 1:
            raise UsageError(f"--workers {workers}: must be >= 1")
        self.kind = resolve_loader(kind, self.workers)
        self.nice = nice
        self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="teal-load")
        self._jobs = _JobQueue()
        self._awaiting: deque[tuple[ImageLoads, int, int]] = deque()  # jobs not received: (loads, first image, count)
        self._loader = None
        self._iterator = None
        self._ready = threading.Event()
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._image_jobs = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a loader thread."""
        return self._threads.submit(fn, *args)

    def load_images(self, prep, paths: Sequence[str]) -> ImageLoads:
        """Start loading ``paths`` with the pixel geometry ``prep`` (a picklable
        :class:`~teal_cli.media.pixels.PixelPrep`)."""
        if self.kind != "processes" or not self._ready.is_set():
            self._image_jobs += len(paths)
            if self.kind == "processes" and self._starter is None and self._image_jobs >= PROCESS_AFTER:
                self._starter = threading.Thread(target=self._start_quietly, name="teal-loader-start", daemon=True)
                self._starter.start()
            return ImageLoads(len(paths), [self._threads.submit(load_image_job, prep, str(p)) for p in paths])
        loads = ImageLoads(len(paths), pull=self._pull)
        size = max(1, min(CHUNK_MAX, math.ceil(len(paths) / self.workers)))
        for first in range(0, len(paths), size):
            self._jobs.jobs.append((prep, [str(p) for p in paths[first : first + size]]))
            self._awaiting.append((loads, first, len(self._jobs.jobs[-1][1])))
        return loads

    def _pull(self) -> None:
        """Receive the oldest job queued (the DataLoader returns jobs in order); a job that
        failed as a whole (a bug, a dead worker) gives its error to each of its images."""
        loads, first, count = self._awaiting.popleft()
        try:
            try:
                pixels, results = next(self._iterator)
            except StopIteration:  # the pass ran dry before this job was queued: a new pass takes it up
                self._iterator = iter(self._loader)
                pixels, results = next(self._iterator)
        except BaseException as exc:  # noqa: BLE001 (raised by result(), for each image of the job)
            if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):  # killed or exited
                broken = BrokenProcessPool(str(exc))
                broken.__cause__, exc = exc, broken
            loads._out[first : first + count] = [exc] * count
            return
        loads._out[first : first + count] = [r if isinstance(r, BaseException) else (pixels[r[0]], r[1]) for r in results]

    @property
    def using_processes(self) -> bool:
        """Whether image jobs now go to the processes."""
        return self._ready.is_set()

    def start(self) -> "Loaders":
        """Start the loader processes now (with ``processes``), and wait until they are up."""
        if self.kind == "processes" and not self._ready.is_set():
            if self._starter is not None:
                self._starter.join()
                if self._start_error is not None:
                    raise self._start_error
            else:
                self._start_processes()
        return self

    def _start_quietly(self) -> None:
        # In the background: if the processes cannot start, the images simply stay on the threads.
        try:
            self._start_processes()
        except BaseException as exc:  # noqa: BLE001 (reported through start() when asked)
            self._start_error = exc

    def _start_processes(self) -> None:
        import multiprocessing
        import warnings

        from torch.utils.data import DataLoader

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        # (No pin_memory: tokenize stacks a batch into page-locked memory itself, one copy.)
        self._loader = DataLoader(_ImageJobs(), batch_sampler=self._jobs, num_workers=self.workers,
                                  collate_fn=_one_job, persistent_workers=True, prefetch_factor=PREFETCH,
                                  worker_init_fn=partial(_quiet_worker, self.nice, os.getpid()), multiprocessing_context=context)
        with warnings.catch_warnings():  # more workers than cores: what --workers asked for
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            self._iterator = iter(self._loader)
        self._ready.set()

    def close(self) -> None:
        if self._starter is not None:
            self._starter.join()
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._iterator is not None:
            # Persistent workers end with their iterator; ask now rather than at garbage collection.
            self._iterator._shutdown_workers()
            self._iterator = self._loader = None
        self._jobs.jobs.clear()
        self._awaiting.clear()

    def __enter__(self) -> "Loaders":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
