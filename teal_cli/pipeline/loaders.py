"""Loader pools: media files decoded and preprocessed ahead of the encoder.

Threads suit audio (soundfile and soxr release the GIL, and waveforms are big to copy) and
small machines. Image decoding also releases the GIL, but PIL's Python-level parsing and
the hand-offs between many threads do not scale: on a 16-core GPU host 16 threads reached
914 images/s and 16 spawned processes 1,303 (decode + 256 px Lanczos resize + crop, uint8
out). So images go to processes once there are ``PROCESS_MIN_WORKERS`` workers or more;
with 4 workers threads were as fast or faster. Workers come from a fork server (the parent
itself is never forked: it may hold CUDA state and threads) that has preloaded only what a
loader needs (PIL, numpy, teal_cli.media.pixels), so they start in milliseconds without importing
torch or the caller's ``__main__``. They return uint8 arrays, a quarter of the bytes of
float pixels; the value mapping runs afterwards on the encoder's device.

What the parent pays per image decides how fast it can feed a GPU, since the same process
launches the encoder, and every thread of it that runs Python holds up those launches.
Several things keep it small (measured on a 2-core machine, 224 px, two loader processes:
0.64 ms of parent CPU per image with one pickled array per job, 0.09 ms with the first two;
loader throughput +31 %):

- jobs carry several images (about one job per worker per window, at most ``CHUNK_MAX``):
  each job costs the parent bookkeeping whatever its size, and the pool is teal's own
  (:class:`_ProcessPool`: one job queue, one receiver thread), which costs less per job than
  ``ProcessPoolExecutor``'s feeder and manager threads;
- images of a fixed shape (every codec that crops) are written by the worker straight into
  shared memory (:class:`SharedSlots`, two regions of a window each); only their content
  size travels back. Where shared memory cannot be reserved (a small ``/dev/shm``, as in
  containers by default), arrays are pickled back as before;
- the encoder's batch is then taken from the slots in place (:meth:`ImageLoads.span`): on
  a CPU as a view of the shared memory, on CUDA by one copy from the slots, which are
  registered as page-locked memory (:meth:`SharedSlots.pin`); a region is handed out again
  only after the device copies that read it are done (:meth:`ImageLoads.release`). This
  took the parent's main thread from 0.083-0.094 to 0.053-0.063 ms per image.

Loader processes also run at a lower priority (``LOADER_NICE``), so that on a host whose
cores are all decoding, the process feeding the GPU is not the one that waits.

With ``raw_bytes`` (``teal tokenize --resize-on device``) loaders only decode images of up
to that many bytes and send them on with the window to resize and crop, which the encoder's
device then computes exactly as Pillow would (:mod:`teal_cli.media.resample`). On a 2-core
machine, decoding alone ran 947 images/s against 585 with the BEiT-v2 resize (224 px bicubic).
Those images travel as Pillow holds them, 4 bytes a pixel (:func:`~teal_cli.media.pixels.rgbx_array`),
and the device drops the padding byte: packing them to 3 bytes took 16 % of a loader's time
per image (500 x 375 JPEGs, decode and hand-over: 2.04-2.08 ms -> 1.73-1.75 ms).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..runtime.cpus import cgroup_cpu_quota, usable_cpus  # noqa: F401 (cgroup_cpu_quota: re-exported)
from ..errors import TealError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

LOADERS = ("auto", "threads", "processes")
PRELOAD = ["numpy", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "teal_cli.media.io", "teal_cli.media.pixels",
           "teal_cli.pipeline.loaders", "teal_cli.media.resample", "multiprocessing.shared_memory"]
PROCESS_MIN_WORKERS = 8
MAX_DEFAULT_WORKERS = 16
PROCESS_AFTER = 128  # image jobs run on threads while the processes start (see Loaders)
CHUNK_MAX = 8  # images per process job
MAX_SLOTS = 512  # images per shared-memory region (a window); larger windows pickle the rest
MAX_SHARED_BYTES = 256 << 20  # all regions of one slot size together
RAW_BYTES = 5 << 18  # --resize-on device: decoded images up to this size, at 4 bytes a pixel, go to the device (640 x 512)
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


def _quiet_worker(nice: int = 0, parent: int | None = None) -> None:
    """Loader processes leave Ctrl-C to the parent, which shuts them down, yield the CPU to it
    (``nice``), and exit when it is gone (``parent``'s pid), even killed outright: nothing
    else would end them, and they would keep the shared memory alive."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:  # not permitted here: run at the parent's priority
            pass
    if parent is not None:
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


class SharedSlots:
    """``count`` slots of ``slot_bytes`` bytes in shared memory, for loader processes to write
    decoded images into. Made by the parent (which reserves the memory up front, so a full
    ``/dev/shm`` is an ``OSError`` here rather than a crash in a worker); pickled as a name
    that worker processes attach to once.

    In the parent, :meth:`tensor` views the slots as one torch tensor and :meth:`pin` registers
    them with CUDA (page-locked), so that the device copies images straight out of the slots,
    with no copy on the host (:meth:`ImageLoads.span`)."""

    _tensor = None  # the parent's torch view of every slot (tensor())
    _pinned: "bool | None" = None  # registered with CUDA (pin()); None: not tried

    def __init__(self, slot_bytes: int, count: int):
        from multiprocessing import shared_memory

        self.slot_bytes, self.count = slot_bytes, count
        self._shm = shared_memory.SharedMemory(create=True, size=count * slot_bytes)
        self._owner = True
        try:
            _reserve(self._shm)
        except OSError:
            self.close()
            raise

    def __reduce__(self):
        return (_attach, (self._shm.name, self.slot_bytes, self.count))

    def array(self, slot: int, shape: Sequence[int]) -> "np.ndarray":
        """Slot ``slot`` as a uint8 array of ``shape`` over the shared memory (no copy)."""
        import numpy as np

        if not 0 <= slot < self.count:
            raise IndexError(f"slot {slot} of {self.count}")
        if math.prod(shape) > self.slot_bytes:
            raise ValueError(f"{list(shape)} does not fit a slot of {self.slot_bytes} bytes")
        return np.ndarray(tuple(shape), np.uint8, buffer=self._shm.buf, offset=slot * self.slot_bytes)

    def tensor(self) -> "torch.Tensor":
        """Every slot, end to end, as one uint8 torch tensor over the shared memory (no copy)."""
        if self._tensor is None:
            import torch

            self._tensor = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=self.count * self.slot_bytes)
        return self._tensor

    def pin(self) -> bool:
        """Register the slots with CUDA as page-locked memory (once); False where it cannot
        be done (no CUDA, or the driver refuses), and copies then go through the host."""
        if self._pinned is None:
            import torch

            self._pinned = False
            if torch.cuda.is_available():
                try:
                    self._pinned = int(torch.cuda.cudart().cudaHostRegister(self.tensor().data_ptr(), self.count * self.slot_bytes, 1)) == 0  # 1: portable
                except (RuntimeError, AttributeError):
                    pass
        return self._pinned

    def close(self) -> None:
        if self._pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self._tensor.data_ptr())
            self._pinned = False
        self._tensor = None
        try:
            self._shm.close()
        except BufferError:  # arrays over it are still referenced: it is unmapped when they go
            pass
        if self._owner:
            self._owner = False
            self._shm.unlink()


def _reserve(shm) -> None:
    """Allocate a shared-memory block's pages now (Linux: its file under /dev/shm)."""
    path = os.path.join("/dev/shm", shm.name.lstrip("/"))
    if not hasattr(os, "posix_fallocate") or not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, shm.size)
    finally:
        os.close(fd)


_ATTACHED: dict[str, SharedSlots] = {}


def _attach(name: str, slot_bytes: int, count: int) -> SharedSlots:
    """In a loader process: the parent's slots ``name``, mapped once per process."""
    slots = _ATTACHED.get(name)
    if slots is None:
        from multiprocessing import shared_memory

        slots = object.__new__(SharedSlots)
        slots.slot_bytes, slots.count, slots._owner = slot_bytes, count, False
        slots._shm = shared_memory.SharedMemory(name=name)
        _ATTACHED[name] = slots
    return slots


def load_image_job(prep, path: str, raw_bytes: int = 0) -> tuple:
    """One image for the encoder: ``(pixels [H, W, 3] uint8, content size or None, window)``.

    ``window`` is None when ``prep`` was applied. With ``raw_bytes``, an image whose geometry
    is a plain window of its resize (:meth:`~teal_cli.media.pixels.PixelPrep.window`) and whose
    decoded pixels fit in ``raw_bytes`` (at 4 bytes a pixel) comes back decoded only, with
    that window: the resize is left to the encoder's device (:mod:`teal_cli.media.resample`, the
    same bytes). Those pixels are ``[H, W, 4]`` where Pillow can hand them over without a
    copy (:func:`~teal_cli.media.pixels.rgbx_array`; the 4th byte is padding), else ``[H, W, 3]``."""
    from ..media.io import load_image
    from ..media.pixels import PixelPrep, rgb_array, rgbx_array

    image = load_image(path)
    if raw_bytes and image.width * image.height * 4 <= raw_bytes:
        window = prep.window(*image.size)
        if window is not None:
            pixels = rgbx_array(image)
            return rgb_array(image) if pixels is None else pixels, None, window
    pixels, size = prep.apply(image, path) if isinstance(prep, PixelPrep) else prep.apply(image)  # (other geometries: apply(image))
    return pixels, size, None


def load_images_job(prep, paths: list[str], shared: SharedSlots | None, slots: list[int | None],
                    raw_bytes: int = 0) -> list[tuple]:
    """The process job: :func:`load_image_job` for each path, in order.

    Per path ``(True, (pixels, shape, size, window))``, with ``pixels`` None when they went to
    ``shared.array(slot, shape)``, or ``(False, error)`` for a bad file (a teal error;
    anything else fails the whole job, as a bug should)."""
    out: list[tuple] = []
    for path, slot in zip(paths, slots):
        try:
            pixels, size, window = load_image_job(prep, path, raw_bytes)
        except TealError as exc:
            out.append((False, exc))
            continue
        shape = pixels.shape
        if slot is not None and pixels.nbytes <= shared.slot_bytes:
            shared.array(slot, shape)[...] = pixels
            pixels = None
        out.append((True, (pixels, shape, size, window)))
    return out


class _Arena:
    """Shared slots for ``regions`` windows of up to ``capacity`` images each. A free region
    may still be read by device copies: ``pending[region]`` are the events that say when
    they are done (:meth:`ImageLoads.release`)."""

    def __init__(self, slot_bytes: int, capacity: int, regions: int = 2):
        self.shared = SharedSlots(slot_bytes, capacity * regions)
        self.capacity = capacity
        self.regions = regions
        self.free = list(range(regions))
        self.pending: dict[int, Sequence[Any]] = {}

    def settle(self, region: int | None = None) -> None:
        """Wait for the device copies still reading ``region`` (every region: None)."""
        for key in [region] if region is not None else list(self.pending):
            for event in self.pending.pop(key, ()):
                event.synchronize()


class ImageLoads:
    """Images being loaded: :meth:`result` ``(i)`` gives ``(pixels [H, W, 3] uint8, content
    size or None, window or None)`` for the i-th path (:func:`load_image_job`), or raises its
    error. Pixels may live in shared memory (``slots[i]``: the slot in ``shared``, known once
    ``result(i)`` returned; else None), reused by a later window once :meth:`release` is
    called: copy them out first, or pass the events after which the copies are done.

    A process job's results are unpacked by the thread that asks for them, not by the
    pool's receiver thread: no future per image to make and settle, and no hand-over
    between threads per image (both held the parent's interpreter lock)."""

    def __init__(self, count: int, release: Callable[[Sequence[Any]], None] | None = None,
                 shared: SharedSlots | None = None):
        self.shared = shared
        self.slots: list[int | None] = [None] * count
        self._release = release
        self._jobs: list[tuple[Future, int, list[int | None] | None]] = []  # (future, first image, slots or None: one image)
        self._job_of: list[int] = [0] * count
        self._out: list[Any] = [None] * count

    def __len__(self) -> int:
        return len(self._out)

    def _add(self, job: Future, first: int, count: int, slots: list[int | None] | None = None) -> None:
        """Images ``first`` .. ``first + count - 1`` come from ``job``: a process job
        (:func:`load_images_job`, writing to ``slots``) or, without ``slots``, a thread job
        (:func:`load_image_job`) for one image."""
        self._job_of[first : first + count] = [len(self._jobs)] * count
        self._jobs.append((job, first, slots))

    def result(self, i: int) -> tuple:
        """Image ``i``'s ``(pixels, content size or None, window or None)``, waiting for it."""
        if self._out[i] is None:
            self._unpack(self._job_of[i])
        out = self._out[i]
        if isinstance(out, BaseException):
            raise out
        return out

    def _unpack(self, index: int) -> None:
        job, first, slots = self._jobs[index]
        try:
            results = job.result()
        except BaseException as exc:  # noqa: BLE001 (a dead pool, a bad file on a thread: each image gets it)
            count = len(slots) if slots is not None else 1
            self._out[first : first + count] = [exc] * count
            return
        if slots is None:
            self._out[first] = results
            return
        for k, (slot, (ok, value)) in enumerate(zip(slots, results)):
            if not ok:
                self._out[first + k] = value
                continue
            pixels, shape, size, window = value
            if pixels is None:
                self.slots[first + k] = slot
                pixels = self.shared.array(slot, shape)
            self._out[first + k] = (pixels, size, window)

    def span(self, indices: Sequence[int]) -> "tuple[torch.Tensor, list[int]] | None":
        """For images ``indices`` (loaded) that are all in shared memory: the slots from the
        first to the last of them as one host tensor, and each image's byte offset in it;
        else None. One copy of that tensor to a device moves them all."""
        slots = [self.slots[i] for i in indices]
        if not slots or None in slots:
            return None
        first, size = min(slots), self.shared.slot_bytes
        host = self.shared.tensor()[first * size : (max(slots) + 1) * size]
        return host, [(slot - first) * size for slot in slots]

    def release(self, after: Sequence[Any] = ()) -> None:
        """The pixels are no longer needed, once the ``after`` events (CUDA events recorded
        after the device copies that read them) have completed."""
        if self._release is not None:
            self._release(after)
            self._release = None


def _pool_worker(jobs, results, stopping, nice: int, parent: int) -> None:
    """A loader process of :class:`_ProcessPool`: say it is up, then run jobs until ``None``
    (skipping those still queued once ``stopping`` is set)."""
    _quiet_worker(nice, parent)
    results.put((None, True, os.getpid()))
    while True:
        job = jobs.get()
        if job is None:
            return
        if stopping.is_set():
            continue
        key, fn, args = job
        try:
            out = (key, True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 (sent back to the job's future)
            out = (key, False, exc)
        try:
            results.put(out)
        except Exception as exc:  # noqa: BLE001 (a result or error that does not pickle)
            results.put((key, False, RuntimeError(f"a loader job's result could not be sent back: {exc!r}")))


class _ProcessPool:
    """Loader processes that take jobs from one queue (an idle worker takes the next job)
    and send results to one receiver thread in the parent.

    What ``concurrent.futures.ProcessPoolExecutor`` does for teal, with less of the parent's
    time: its feeder and manager threads cost ~0.35 ms of CPU per job (holding the
    interpreter lock the thread launching GPU work needs) where this pool costs ~0.15-0.2
    (2-core machine, jobs of a window in flight as tokenize submits them). As there, a
    worker that dies breaks the pool: every job not done gets ``BrokenProcessPool``."""

    def __init__(self, workers: int, context, nice: int, parent: int, start_timeout: float = 60.0):
        from multiprocessing.connection import wait

        self._jobs = context.SimpleQueue()
        self._results = context.SimpleQueue()
        self._stopping = context.Event()
        self._futures: dict[int, Future] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._broken: BaseException | None = None
        self._closing = False
        started = [context.Process(target=_pool_worker, args=(self._jobs, self._results, self._stopping, nice, parent),
                                   name=f"teal-loader-{i}", daemon=True) for i in range(workers)]
        self._processes = {}
        try:
            for process in started:
                process.start()
                self._processes[process.pid] = process
            up = 0
            while up < workers:  # each worker says it is up; one that dies first fails the start
                ready = wait([self._results._reader, *(p.sentinel for p in started)], timeout=start_timeout)
                if self._results._reader in ready:
                    self._results.get()
                    up += 1
                else:
                    raise RuntimeError("a loader process ended while starting" if ready else "loader processes did not start")
        except BaseException:
            self._stop()
            raise
        self._receiver = threading.Thread(target=self._receive, name="teal-loader-results", daemon=True)
        self._receiver.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._broken is not None:
                future.set_exception(self._broken)
                return future
            key, self._next = self._next, self._next + 1
            self._futures[key] = future
        self._jobs.put((key, fn, args))
        return future

    def _receive(self) -> None:
        from concurrent.futures.process import BrokenProcessPool
        from multiprocessing.connection import wait

        reader = self._results._reader
        sentinels = {p.sentinel for p in self._processes.values()}
        while True:
            ready = wait([reader, *sentinels])
            if reader in ready:  # results first: a worker may have sent some before another died
                key, ok, value = self._results.get()
                with self._lock:
                    future = self._futures.pop(key, None)
                if future is not None:
                    try:
                        future.set_result(value) if ok else future.set_exception(value)
                    except InvalidStateError:  # cancelled meanwhile
                        pass
                continue
            sentinels.difference_update(ready)
            if not self._closing:
                self._fail(BrokenProcessPool("a loader process ended abruptly"))
                return
            if not sentinels:
                return

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._broken = exc
            pending, self._futures = list(self._futures.values()), {}
        for future in pending:
            if not future.done():
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel the jobs not done (workers skip those still queued), let the workers finish
        the one they hold, and end them."""
        self._closing = True
        with self._lock:
            pending, self._futures = list(self._futures.values()), {}
        for future in pending:
            future.cancel()
        self._stop()
        self._receiver.join(timeout=5)

    def _stop(self) -> None:
        self._closing = True
        self._stopping.set()
        if self._broken is None:
            for _ in self._processes:
                self._jobs.put(None)
        for process in self._processes.values():
            process.join(timeout=5 if self._broken is None else 0.5)
        for process in self._processes.values():  # stuck (a dead worker held a queue's lock) or broken
            if process.is_alive():
                process.terminate()
                process.join()


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

    def __init__(self, workers: int | None = None, kind: str = "auto", nice: int = LOADER_NICE):
        self.workers = default_workers() if workers is None else workers
        self.nice = nice
        if self.workers < 1:
            raise UsageError(f"--workers {workers}: must be >= 1")
        self.kind = resolve_loader(kind, self.workers)
        self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="teal-load")
        self._processes = None
        self._ready = threading.Event()
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._image_jobs = 0
        self._arenas: dict[int, _Arena | None] = {}
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a loader thread."""
        return self._threads.submit(fn, *args)

    def load_images(self, prep, paths: Sequence[str], raw_bytes: int = 0) -> ImageLoads:
        """Start loading ``paths`` with the pixel geometry ``prep`` (a picklable
        :class:`~teal_cli.media.pixels.PixelPrep`), leaving resizes to the device for images of up
        to ``raw_bytes`` decoded (:func:`load_image_job`); call :meth:`ImageLoads.release`
        once the pixels have been copied out."""
        if self.kind != "processes" or not self._ready.is_set():
            loads = ImageLoads(len(paths))
            for i, path in enumerate(paths):
                loads._add(self._submit_image(load_image_job, prep, path, raw_bytes), i, 1)
            return loads
        fixed = getattr(prep, "fixed_shape", None)
        slot_bytes = max(math.prod(fixed) if fixed else 0, raw_bytes) or None
        arena, region = self._region(slot_bytes, len(paths))
        shared = arena.shared if arena is not None else None
        loads = ImageLoads(len(paths), partial(self._free, arena, region) if arena is not None else None, shared)
        size = max(1, min(CHUNK_MAX, math.ceil(len(paths) / self.workers)))
        for start in range(0, len(paths), size):
            part = range(start, min(start + size, len(paths)))
            slots = [region * arena.capacity + i if arena is not None and i < arena.capacity else None for i in part]
            job = self._processes.submit(load_images_job, prep, [str(paths[i]) for i in part], shared, slots, raw_bytes)
            loads._add(job, start, len(part), slots)
        return loads

    def _region(self, slot_bytes: int | None, count: int) -> tuple[_Arena | None, int]:
        """A free window region of shared slots for ``count`` images of up to ``slot_bytes``,
        or ``(None, 0)`` (the images then come back pickled)."""
        if slot_bytes is None or count == 0:
            return None, 0
        with self._lock:
            arena = self._arenas.get(slot_bytes, False)
            grow = arena and arena.capacity < count and len(arena.free) == arena.regions
            if arena is False or grow:
                if grow:
                    arena.settle()
                    arena.shared.close()
                try:
                    arena = _Arena(slot_bytes, max(1, min(count, MAX_SLOTS, MAX_SHARED_BYTES // (2 * slot_bytes))))
                except OSError:  # no room in /dev/shm: pickle (not retried for this size)
                    arena = None
                self._arenas[slot_bytes] = arena
            if arena is None or not arena.free:
                return None, 0
            region = arena.free.pop(0)  # the region freed first: its device copies are the likeliest done
        arena.settle(region)
        return arena, region

    def _free(self, arena: _Arena, region: int, after: Sequence[Any] = ()) -> None:
        with self._lock:
            if after:
                arena.pending[region] = list(after)
            arena.free.append(region)

    def _submit_image(self, fn: Callable[..., Any], *args: Any) -> Future:
        """One image job on the threads, counting towards starting the processes."""
        if self.kind == "processes":
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

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self._processes = _ProcessPool(self.workers, context, self.nice, os.getpid())
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
            self._processes.shutdown()
        for arena in self._arenas.values():
            if arena is not None:
                arena.settle()
                arena.shared.close()
        self._arenas.clear()

    def __enter__(self) -> "Loaders":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
