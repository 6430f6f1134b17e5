"""k-means for codebooks: a fast Lloyd loop in plain torch, CPU and CUDA with the same code.

The nearest centroid of a row x is ``argmin_j ||c_j||² − 2 x·c_j`` (``||x||²`` is the same for
every j, so it only comes back in to report distances). That is one ``addmm`` per chunk of rows
into a preallocated buffer and one ``min`` over it: one pass over the data per iteration, with
the N×K distance matrix never held whole unless it is small. Per-cluster sums are built with
``index_add_`` inside that pass while many points move, and later updated only for the rows
that changed cluster. Distances and sums are always fp32; half-precision input is upcast a
chunk at a time. On a 2-core CPU one pass costs ~1.15× the bare matmul. The pass itself
(``_nearest``) is in :mod:`teal_cli.codecs.assign`, with the codec's :func:`assign`.

Distribution is injected, not imported: ``all_reduce_fn`` sums a tensor in place across
processes (``torch.distributed.all_reduce`` fits), so the same code runs on one CPU.

``kmeans_streaming`` handles data larger than memory: fit on a uniform reservoir sample, then
a few Lloyd passes over the whole stream.

faiss is an optional backend (``backend="faiss"``), imported only when asked for.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from ..codecs.assign import (  # the nearest-centroid passes, shared with the k-means codec
    _Buffers,
    _check_data,
    _chunk_fp32,
    _nearest,
    _sq_norms,
    auto_chunk_size,
)
from ..codecs.assign import assign, sample_assign  # noqa: F401  (k-means' API too: fit.py and callers import them from here)
from ..errors import DataError, UsageError

BACKENDS = ("torch", "faiss")
EMPTY_POLICIES = ("reseed", "keep")

# faiss's default cap on training points per centroid, reused as the default sample size
# of kmeans_streaming.
SAMPLE_PER_CENTROID = 256

# k-means++ reads the data once per centroid, so kmeans() seeds on a uniform sample of at
# most this many rows per centroid (all rows when N is smaller): at 1M×768 and k=1024 on CPU,
# full-data seeding would take longer than 50 Lloyd iterations.
SEED_SAMPLE_PER_CENTROID = 64

# Incrementally updated cluster sums are rebuilt from scratch at least this often.
REBUILD_EVERY = 10


@dataclass
class KMeansResult:
    """What ``kmeans`` returns.

    ``history`` holds the inertia measured by every assignment pass, so
    ``history[0]`` is that of the initial centroids, ``len(history) == iterations + 1`` (for
    the in-memory fit) and ``history[-1] == inertia``, the inertia of ``centroids``.
    """

    centroids: Tensor  # [k, d] float32, on the device of the input
    inertia: float  # sum of squared distances of the fitted data to its nearest centroid
    iterations: int  # Lloyd iterations (centroid updates) run
    history: list[float] = field(default_factory=list)
    backend: str = "torch"


# ---------------------------------------------------------------------------- checks


def _check_k(k: int, n: int | None) -> None:
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")
    if n is not None and k > n:
        raise UsageError(f"k={k} is larger than the number of points ({n}); use k <= {n}")


@contextlib.contextmanager
def _cuda_tf32(enabled: bool, device: torch.device):
    """Pin cuBLAS fp32 matmuls to TF32 or to full fp32 for the duration, then restore.

    Pinning "off" matters as much as "on": a process that enabled TF32 globally would
    otherwise silently get approximate distances. torch refuses to mix its legacy
    (``allow_tf32``) and new (``fp32_precision``) switches, so use whichever the process uses.
    """
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    try:
        old, name, new = flags.allow_tf32, "allow_tf32", enabled
    except RuntimeError:
        old, name, new = flags.fp32_precision, "fp32_precision", "tf32" if enabled else "ieee"
    setattr(flags, name, new)
    try:
        yield
    finally:
        setattr(flags, name, old)


# ---------------------------------------------------------------------------- initialisation


def kmeans_plusplus(
    x: Tensor, k: int, *, generator: torch.Generator | None = None, chunk_size: int | None = None
) -> Tensor:
    """Greedy k-means++ seeding: ``[k, d]`` fp32 centroids picked among the rows of ``x``.

    The greedy variant (as in scikit-learn): each new centroid is the best of ``2 + ln k``
    candidates drawn with probability proportional to D(x)², "best" meaning the one that
    lowers the total potential most. It reads x once per centroid, so for very large N seed
    on a sample. Deterministic given ``generator`` (default: a CPU generator seeded 0; a CPU
    generator picks the same rows whether x is on CPU or CUDA).
    """
    _check_data(x, finite=False)
    _check_k(k, x.shape[0])
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    chunk = chunk_size or auto_chunk_size(x.shape[0], k, x.device)
    with torch.no_grad():
        return _plusplus(x, k, generator, chunk, _sq_norms(x, chunk))


def _plusplus(x: Tensor, k: int, generator: torch.Generator, chunk: int, x_sq: Tensor) -> Tensor:
    n, device = x.shape[0], x.device
    trials = 2 + int(math.log(k))
    # All random numbers up front, on the generator's device, then moved once: no host
    # round trip per step and the same draws on every device.
    first = torch.randint(n, (1,), generator=generator, device=generator.device).to(device)
    draws = torch.rand(k, trials, generator=generator, device=generator.device, dtype=torch.float64).to(device)
    scratch = None if x.dtype == torch.float32 else torch.empty(min(chunk, n), x.shape[1], device=device)
    dist = torch.empty(n, trials, dtype=torch.float32, device=device)

    def sq_dist(cands: Tensor) -> Tensor:  # [n, m] squared distances to m candidate rows
        out = dist[:, : cands.shape[0]]
        c_sq = torch.linalg.vecdot(cands, cands)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            torch.addmm(c_sq, _chunk_fp32(x, s, e, scratch), cands.t(), alpha=-2.0, out=out[s:e])
        return out.add_(x_sq[:, None])

    centroids = torch.empty(k, x.shape[1], dtype=torch.float32, device=device)
    centroids[0] = x[first].float()
    # Clamped: rounding can make a distance slightly negative, and the CDF must not decrease.
    closest = sq_dist(centroids[:1]).squeeze(1).clamp_min(0.0)
    for i in range(1, k):
        # Sample candidates ∝ D²: inverse CDF on a float64 cumsum (multinomial caps N at 2^24).
        cdf = torch.cumsum(closest, 0, dtype=torch.float64)
        picks = torch.searchsorted(cdf, draws[i] * cdf[-1]).clamp_(max=n - 1)
        cands = x[picks].float()
        d = torch.minimum(sq_dist(cands), closest[:, None], out=dist)
        best = d.sum(0).argmin().view(1)  # stays on device: no sync per step
        closest = d.index_select(1, best).squeeze(1).clamp_min_(0.0)
        centroids[i] = cands.index_select(0, best).squeeze(0)
    return centroids


# ---------------------------------------------------------------------------- Lloyd


def _reseed_farthest(x: Tensor, ids: Tensor, dist: Tensor, sums: Tensor, counts: Tensor, empty_ids: Tensor) -> None:
    """Give each empty cluster one of the points farthest from their centroid (in place).

    The moved point leaves its old cluster's sum and count, as scikit-learn does, so the
    update stays a true mean; ``ids`` records the move so the incremental sums of the next
    iteration start from it. Deterministic: no randomness, ties broken by topk.
    """
    far = torch.topk(dist, empty_ids.numel()).indices
    rows = x[far].to(sums.dtype)
    owners = ids[far]
    sums.index_add_(0, owners, rows, alpha=-1.0)
    counts.index_add_(0, owners, torch.full_like(owners, -1, dtype=counts.dtype))
    sums[empty_ids] = rows
    counts[empty_ids] = 1
    ids[far] = empty_ids


def _exact_sq_dist(x: Tensor, centroids: Tensor, ids: Tensor, chunk: int) -> Tensor:
    """||x_i − c_ids[i]||² by explicit differences: full fp32 whatever the matmul precision."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        diff = x[s : s + chunk].float() - centroids[ids[s : s + chunk]]
        torch.linalg.vector_norm(diff, dim=1, out=out[s : s + chunk])
    return out.square_()


def _reseed_split(centroids: Tensor, counts: Tensor, empty_ids: Tensor, generator: torch.Generator) -> None:
    """Distributed fallback: split the most populated cluster into two nearby centroids.

    A sum-only all-reduce cannot pick a global farthest point, but counts are global, so
    every process makes the same split (the generator is seeded alike everywhere).
    """
    counts = counts.clone()
    for j in empty_ids.tolist():
        big = int(counts.argmax())
        c = centroids[big]
        noise = torch.rand(c.shape, generator=generator, device=generator.device).to(c.device)
        delta = (noise * 2 - 1) * (c.norm() / math.sqrt(c.numel()) / 1024 + 1e-6)
        centroids[j] = c + delta
        centroids[big] = c - delta
        counts[j] = counts[big] // 2
        counts[big] -= counts[j]


# ---------------------------------------------------------------------------- backend choice

def _resolve_backend(backend: str, x: Tensor, all_reduce_fn, tol: float) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown k-means backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if x.device.type != "cpu":
        raise UsageError("backend='faiss' uses faiss-cpu and needs CPU data; move x to CPU or use backend='torch'")
    if all_reduce_fn is not None or tol != 0:
        raise UsageError("backend='faiss' supports neither all_reduce_fn nor tol; use backend='torch'")
    _faiss_module(required=True)
    return "faiss"


def _faiss_module(required: bool):
    try:
        import faiss
    except ImportError:
        if required:
            raise UsageError("backend='faiss' needs faiss: pip install faiss-cpu (or use backend='torch')") from None
        return None
    return faiss


def _kmeans_faiss(x: Tensor, x_sq: Tensor, init: Tensor, iters: int, seed: int, chunk: int, progress) -> KMeansResult:
    """faiss's Lloyd loop from our initial centroids; inertia recomputed exactly at the end.

    faiss handles empty clusters its own way (splitting a large cluster), whatever ``empty``
    says, and never subsamples here (max_points_per_centroid is lifted to N).
    """
    faiss = _faiss_module(required=True)
    k, d = init.shape
    data = x.detach().float().contiguous().numpy()
    km = faiss.Kmeans(
        d, k, niter=iters, seed=seed, verbose=False, max_points_per_centroid=x.shape[0], min_points_per_centroid=1
    )
    history: list[float] = []
    if iters > 0:
        km.train(data, init_centroids=init.detach().cpu().float().contiguous().numpy())
        centroids = torch.from_numpy(km.centroids.copy()).reshape(k, d)
        history = [float(v) for v in km.obj]
    else:
        centroids = init.detach().cpu().float().clone()
    # faiss's objective is that of the centroids before each update; report the returned ones'.
    _, dist = _nearest(x, centroids, x_sq, chunk, exact=True)
    inertia = float(dist.sum(dtype=torch.float64))
    history.append(inertia)
    if progress is not None:
        for i, v in enumerate(history):
            progress(i, v)
    return KMeansResult(centroids, inertia, iters, history, "faiss")


def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 50,
    tol: float = 0.0,
    init: str | Tensor = "k-means++",
    seed: int = 0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    empty: str = "reseed",
    backend: str = "torch",
    all_reduce_fn: Callable[[Tensor], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
    allow_tf32: bool = False,
) -> KMeansResult:
    """Lloyd's k-means on the rows of ``x`` ([N, d], any float dtype, CPU or CUDA).

    - ``init``: ``"k-means++"`` (greedy, see ``kmeans_plusplus``; on a uniform sample of
      ``64 * k`` rows when N is larger), ``"random"`` (k distinct rows) or a ``[k, d]``
      tensor. Randomness comes from ``generator`` or else ``seed``.
    - ``iters`` updates at most; with ``tol > 0`` stop once the relative inertia change
      between two passes is below ``tol``. ``tol=0`` runs all ``iters`` unless a fixed point
      comes first (no point changed cluster), after which every update is a no-op.
    - ``empty``: ``"reseed"`` moves an empty cluster onto the point farthest from its
      centroid (with ``all_reduce_fn``: splits the biggest cluster instead); ``"keep"``
      leaves its centroid where it was.
    - ``backend``: ``"torch"``, or ``"faiss"`` (faiss-cpu's loop from the same init, CPU
      only; which is faster depends on the CPU and on the BLAS in faiss's wheel, see
      ``benchmarks/kmeans.py``).
    - ``all_reduce_fn``: in-place sum across processes; each process passes its own shard
      and the same ``init`` tensor, and gets the same centroids back.
    - ``progress(i, inertia)`` is called after each assignment pass.
    - ``allow_tf32`` (CUDA only): distance matmuls in TF32 (7× faster than fp32 on an H100
      at 1M×768, k=2048). TF32 keeps 10 mantissa bits, so points near a tie can pick the
      other cluster: there the fit's inertia moved by 2e-6 relative. ``history`` entries are
      then TF32 estimates, but the returned ``inertia`` measures each point's distance to
      its cluster in full fp32.

    The returned ``inertia`` is exact for the returned centroids: after the last update one
    more assignment pass measures it (``history[-1]``). On CUDA, ``index_add_`` sums with
    atomics, so the last bits can vary between runs.
    """
    _check_data(x, finite=False)
    if not isinstance(iters, int) or iters < 0:
        raise UsageError(f"iters must be a non-negative integer, got {iters!r}")
    if tol < 0:
        raise UsageError(f"tol must be >= 0, got {tol!r}")
    if empty not in EMPTY_POLICIES:
        raise UsageError(f"empty={empty!r}: expected one of {', '.join(EMPTY_POLICIES)}")
    n, d = x.shape
    distributed = all_reduce_fn is not None
    # A shard may hold fewer than k rows; only the global count matters then.
    _check_k(k, None if distributed and isinstance(init, Tensor) else n)
    backend = _resolve_backend(backend, x, all_reduce_fn, tol)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    chunk = chunk_size or auto_chunk_size(n, k, x.device)

    with torch.no_grad():
        x_sq = _sq_norms(x, chunk)
        centroids = _initial_centroids(x, x_sq, k, init, generator, chunk, distributed)
        if backend == "faiss":
            return _kmeans_faiss(x, x_sq, centroids, iters, seed, chunk, progress)
        return _lloyd(x, x_sq, centroids, iters, tol, chunk, empty, generator, all_reduce_fn, progress, allow_tf32)


def _initial_centroids(x: Tensor, x_sq: Tensor, k: int, init: str | Tensor, generator: torch.Generator, chunk: int,
                       distributed: bool) -> Tensor:
    """``kmeans``'s ``init``: ``[k, d]`` float32 centroids on x's device."""
    n, d = x.shape
    if isinstance(init, Tensor):
        if tuple(init.shape) != (k, d):
            raise UsageError(f"init has shape {tuple(init.shape)}, expected ({k}, {d})")
        _check_data(init, "init")
        return init.detach().to(device=x.device, dtype=torch.float32).clone()
    if distributed:
        raise UsageError(
            "with all_reduce_fn, pass init= a [k, d] tensor identical on every process "
            "(e.g. kmeans_plusplus on one process, then broadcast)"
        )
    if init == "k-means++":
        if n > SEED_SAMPLE_PER_CENTROID * k:
            rows = torch.randperm(n, generator=generator, device=generator.device)[: SEED_SAMPLE_PER_CENTROID * k]
            rows = rows.to(x.device)
            return _plusplus(x[rows], k, generator, chunk, x_sq[rows])
        return _plusplus(x, k, generator, chunk, x_sq)
    if init == "random":
        rows = torch.randperm(n, generator=generator, device=generator.device)[:k].to(x.device)
        return x[rows].float()
    raise UsageError(f"init={init!r}: expected 'k-means++', 'random' or a [k, d] tensor")


def _lloyd(x, x_sq, centroids, iters, tol, chunk, empty, generator, all_reduce_fn, progress, tf32) -> KMeansResult:
    """The Lloyd loop of ``kmeans`` (arguments already checked)."""
    n, k = x.shape[0], centroids.shape[0]
    tf32 = tf32 and x.device.type == "cuda"
    distributed = all_reduce_fn is not None
    # Per-cluster sums of this process's rows, in float64: exact for up to 2^29 equal rows, so
    # a cluster of identical points gets exactly that point back, and incremental updates do
    # not drift. Rebuilt from fp32 deviations to the current centroids (see _nearest).
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    deviations = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    buffers = _Buffers(n, k, x.shape[1], chunk, x.dtype, x.device)
    prev_ids = torch.empty(n, dtype=torch.int64, device=x.device)
    have_prev, rebuild = False, True
    history: list[float] = []
    iterations = 0
    for it in range(iters + 1):
        last = it == iters
        # Per-cluster sums are rebuilt inside the pass (deviations of each chunk while it is
        # hot) while many points move, and every REBUILD_EVERY iterations; otherwise only the
        # rows that changed cluster are moved between sums, late in a fit a small fraction
        # of N. The last pass measures exact distances (differences, full fp32 even under
        # TF32), so the returned inertia is exact for the returned centroids.
        fused = rebuild and not last
        if fused:
            deviations.zero_()
        with _cuda_tf32(tf32, x.device):
            ids, dist = _nearest(x, centroids, x_sq, chunk, deviations if fused else None, buffers, exact=last)
        moved = (ids != prev_ids).nonzero().squeeze(1) if have_prev else None
        n_moved = n if moved is None else moved.numel()
        local_counts = torch.bincount(ids, minlength=k)
        if fused:
            torch.addcmul(deviations.double(), local_counts.double()[:, None], centroids.double(), out=sums)
        elif not last and n_moved:
            # One index_add_ moves the rows: + into their new cluster, − out of the old one.
            rows = torch.empty(2 * n_moved, x.shape[1], dtype=torch.float64, device=x.device)
            rows[:n_moved] = x[moved]
            torch.neg(rows[:n_moved], out=rows[n_moved:])
            sums.index_add_(0, torch.cat([ids[moved], prev_ids[moved]]), rows)
        # One small reduction carries counts (exact in float64), inertia and points moved.
        stats = torch.empty(k + 2, dtype=torch.float64, device=x.device)
        stats[:k] = local_counts
        stats[k] = dist.sum(dtype=torch.float64)
        stats[k + 1] = n_moved
        if distributed:
            all_reduce_fn(stats)
        inertia, global_moved, counts = float(stats[k]), int(stats[k + 1]), stats[:k]
        history.append(inertia)
        if progress is not None:
            progress(it, inertia)
        empty_ids = (counts == 0).nonzero().squeeze(1)
        # A fixed point: no point changed cluster and no empty cluster will be refilled, so
        # every further iteration would return these same centroids.
        fixed = it > 0 and global_moved == 0 and (empty == "keep" or empty_ids.numel() == 0)
        if last or fixed or (tol > 0 and it > 0 and abs(history[-2] - inertia) <= tol * history[-2]):
            break
        total = sums
        if distributed:
            total = sums.clone()
            all_reduce_fn(total)
        elif empty == "reseed" and empty_ids.numel():
            _reseed_farthest(x, ids, dist, sums, counts, empty_ids)
        means = (total / counts.clamp_min(1)[:, None]).float()
        # Clusters still empty keep their old centroid (for "keep", and for "reseed" a
        # cluster whose only point was moved away).
        centroids = torch.where((counts > 0)[:, None], means, centroids)
        if distributed and empty == "reseed" and empty_ids.numel():
            _reseed_split(centroids, counts, empty_ids, generator)
        prev_ids.copy_(ids)  # ids is the reused buffer of the next pass
        have_prev, rebuild = True, 4 * n_moved > n or (it + 1) % REBUILD_EVERY == 0
        iterations += 1

    if not last:
        # Stopped early (fixed point or tol): that pass's distances came from the expansion;
        # measure the returned centroids' inertia by explicit differences.
        total = _exact_sq_dist(x, centroids, ids, chunk).sum(dtype=torch.float64).view(1)
        if distributed:
            all_reduce_fn(total)
        history[-1] = float(total)
    return KMeansResult(centroids, history[-1], iterations, history, "torch")


# ---------------------------------------------------------------------------- streaming


def _batches_on(batches: Callable[[], Iterable[Tensor]], device, d: int | None = None):
    """One fresh pass of ``batches()``: each non-empty chunk checked, moved to ``device``,
    and yielded with its squared row norms (computing them is the NaN/inf check)."""
    for i, b in enumerate(batches()):
        b = torch.as_tensor(b)
        if b.dim() != 2 or (d is not None and b.shape[1] != d):
            raise DataError(f"batch {i}: expected shape [n, {d or 'd'}], got {tuple(b.shape)}")
        if b.shape[0] == 0:
            continue
        _check_data(b, f"batch {i}", finite=False)
        d = b.shape[1]
        b = b if device is None else b.to(device)
        yield b, _sq_norms(b, b.shape[0], f"batch {i}")


def _reservoir(batches, size: int, generator: torch.Generator, device) -> tuple[Tensor, int]:
    """Uniform sample (fp32) of ``size`` rows in one pass, holding the sample plus one chunk.

    Bottom-k sampling: every row gets a uniform random key and the ``size`` smallest keys
    win, a uniform sample without replacement however the stream is chunked. Once the
    sample is full, a chunk's rows only get in by beating the largest key held, and take
    the slots of the keys they push out, so late chunks copy almost nothing.
    """
    pending: list[tuple[Tensor, Tensor]] = []  # chunks held whole until `size` rows are seen
    rows = keys = None
    n = 0
    for b, _ in _batches_on(batches, device):
        n += b.shape[0]
        bkeys = torch.rand(b.shape[0], generator=generator, device=generator.device).to(b.device)
        if rows is None:
            pending.append((b.float(), bkeys))
            if n >= size:
                rows, keys = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
                pending.clear()
                kept = torch.topk(keys, size, largest=False).indices
                rows, keys = rows[kept], keys[kept]
            continue
        better = bkeys < keys.max()
        if not bool(better.any()):
            continue
        new_rows, new_keys = b[better], bkeys[better]
        kept = torch.topk(torch.cat([keys, new_keys]), size, largest=False).indices
        admitted = kept[kept >= size] - size
        freed = torch.ones(size, dtype=torch.bool, device=keys.device)
        freed[kept[kept < size]] = False
        slots = freed.nonzero().squeeze(1)
        rows[slots] = new_rows[admitted].float()
        keys[slots] = new_keys[admitted]
    if rows is None:  # fewer than `size` rows in the whole stream: keep them all
        if not pending:
            raise DataError("the batch stream is empty; k-means needs at least one point")
        rows = torch.cat([p[0] for p in pending])
    return rows, n


def kmeans_streaming(
    batches: Callable[[], Iterable[Tensor]],
    k: int,
    *,
    sample: int | None = None,
    iters: int = 50,
    passes: int = 1,
    seed: int = 0,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    progress: Callable[[int, float], None] | None = None,
    allow_tf32: bool = False,
) -> KMeansResult:
    """k-means on data too large for memory, given as a re-iterable stream of [n_i, d] chunks.

    ``batches()`` must return a fresh iterator over the whole data set on every call. The
    stream is read ``passes + 2`` times: once to draw a uniform sample of ``sample`` rows
    (default ``256 * k``, faiss's cap on points per centroid) and fit ``kmeans`` on it, then
    ``passes`` streaming Lloyd passes (per-cluster sums and counts accumulated chunk by
    chunk; empty clusters keep their centroid), then one pass to measure the inertia of the
    returned centroids over all the data. Memory holds the sample plus one chunk.
    ``allow_tf32`` is as for :func:`kmeans`; the final inertia pass is always full fp32.

    ``history`` is the full-data inertia at the start of each streaming pass, then the
    final one (``progress(p, inertia)`` sees each); ``iterations`` counts the Lloyd
    iterations of the sample fit plus ``passes``. ``device`` defaults to that of the first
    chunk; chunks may be any float dtype and are moved there one at a time.
    """
    _check_k(k, None)
    if sample is not None and sample < k:
        raise UsageError(f"sample={sample} must be at least k={k}")
    if passes < 0:
        raise UsageError(f"passes must be >= 0, got {passes}")
    size = sample or SAMPLE_PER_CENTROID * k
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pool, n = _reservoir(batches, size, generator, device)
        _check_k(k, n)
        fit = kmeans(pool, k, iters=iters, generator=generator, chunk_size=chunk_size, allow_tf32=allow_tf32)
        centroids, device = fit.centroids, fit.centroids.device
        del pool
        history: list[float] = []
        for p in range(passes + 1):
            last = p == passes
            sums = torch.zeros_like(centroids)
            counts = torch.zeros(k, dtype=torch.int64, device=device)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for b, b_sq in _batches_on(batches, device, centroids.shape[1]):
                chunk = chunk_size or auto_chunk_size(b.shape[0], k, device)
                with _cuda_tf32(allow_tf32 and not last, torch.device(device)):
                    ids, dist = _nearest(b, centroids, b_sq, chunk, None if last else sums, exact=last)
                counts += torch.bincount(ids, minlength=k)
                total += dist.sum(dtype=torch.float64)
            history.append(float(total))
            if progress is not None:
                progress(p, history[-1])
            if not last:  # sums holds deviations from the pass's centroids (see _nearest)
                means = centroids + sums / counts.clamp_min(1).to(torch.float32)[:, None]
                centroids = torch.where((counts > 0)[:, None], means, centroids)
    return KMeansResult(centroids, history[-1], fit.iterations + passes, history, "torch")
