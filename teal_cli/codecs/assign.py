"""Nearest-centroid assignment: a k-means codec's encode step, and the pass k-means fitting repeats.

The nearest centroid of a row x is ``argmin_j ||c_j||² − 2 x·c_j`` (``||x||²`` is the same for
every j, so it only comes back in to report distances). That is one ``addmm`` per chunk of rows
into a preallocated buffer and one ``min`` over it, with the N×K distance matrix never held
whole unless it is small. Distances are always fp32; half-precision input is upcast a chunk at
a time. :func:`assign` gives the nearest centroid, :func:`sample_assign` a centroid drawn by
distance (stochastic quantisation); :mod:`teal_cli.cluster.kmeans` fits centroids with the
same pass (``_nearest``). It lives in ``codecs`` because the codec needs it and the fitting,
a higher package, builds on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError, UsageError

# The distance buffer of one chunk is kept at about this size: on a 2-core CPU 16 MiB beat
# 4 and 64 MiB by 5–8 % (timings in benchmarks/README.md); on CUDA big chunks keep the
# Python loop short.
CPU_CHUNK_BYTES = 16 << 20
CUDA_CHUNK_BYTES = 1 << 30


def _check_data(x: Tensor, name: str = "x", finite: bool = True) -> None:
    """Shape and dtype; with ``finite``, also NaN/inf (a full pass: big inputs use _sq_norms)."""
    if not isinstance(x, Tensor):
        raise UsageError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise DataError(f"{name}: expected a [n, d] matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name}: empty input (shape {tuple(x.shape)}); k-means needs at least one point")
    if not x.is_floating_point():
        raise DataError(f"{name}: expected floating-point data, got {x.dtype}")
    if finite and not bool(torch.isfinite(x).all()):
        raise DataError(f"{name}: contains NaN or infinite values; clean or drop those rows first")


def auto_chunk_size(n: int, k: int, device: torch.device | str) -> int:
    """Rows per chunk so that one chunk's [rows, k] fp32 distance buffer stays bounded."""
    budget = CUDA_CHUNK_BYTES if torch.device(device).type == "cuda" else CPU_CHUNK_BYTES
    return max(1, min(n, budget // (4 * k)))


def _chunk_fp32(x: Tensor, start: int, stop: int, scratch: Tensor | None) -> Tensor:
    """Rows start:stop of x as fp32, upcast into a reused buffer when x is not fp32."""
    rows = x[start:stop]
    if rows.dtype == torch.float32:
        return rows
    out = scratch[: stop - start]
    out.copy_(rows)
    return out


def _sq_norms(x: Tensor, chunk: int, name: str = "x") -> Tensor:
    """||x_i||² in fp32, which doubles as the NaN/inf check of x.

    A NaN or inf anywhere in a row makes its squared norm non-finite, so checking these N
    values replaces ``isfinite(x).all()`` (20× the cost of this pass on CPU).
    ``vector_norm`` then squaring is ~6× faster than ``vecdot`` on CPU and 1 ulp apart.
    """
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        torch.linalg.vector_norm(x[s : s + chunk], dim=1, dtype=torch.float32, out=out[s : s + chunk])
    out.square_()
    if not bool(torch.isfinite(out).all()):
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{name}: contains NaN or infinite values; clean or drop those rows first")
        raise DataError(f"{name}: values too large for fp32 squared distances (norms above ~1e19); rescale the data")
    return out


class _Buffers:
    """Per-fit scratch of ``_nearest``: allocated once and reused by every pass.

    A fresh 16 MiB distance buffer per pass is fresh memory from the OS on every pass (glibc
    maps big blocks and unmaps them on free): page faults on first touch, every iteration.
    """

    def __init__(self, n: int, k: int, d: int, chunk: int, dtype: torch.dtype, device: torch.device):
        rows = min(chunk, n)
        self.buf = torch.empty(rows, k, dtype=torch.float32, device=device)
        self.scratch = None if dtype == torch.float32 else torch.empty(rows, d, device=device)
        self.ids = torch.empty(n, dtype=torch.int64, device=device)
        self.dist = torch.empty(n, dtype=torch.float32, device=device)


def _nearest(
    x: Tensor,
    centroids: Tensor,
    x_sq: Tensor,
    chunk: int,
    deviations: Tensor | None = None,
    buffers: _Buffers | None = None,
    exact: bool = False,
) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row and its squared distance; one pass over x.

    The argmin comes from the ``||c||² − 2x·c`` GEMM. The distances returned are
    ``||x||² + that`` (rounding error ~1e-7 of ``||x||²`` per row), or with ``exact`` (or
    ``deviations``) ``||x − c||²`` from the explicit differences of each chunk while it is
    still in cache: exactly 0 for a row equal to its centroid.

    With ``deviations`` ([k, d] fp32), ``x_i − c_ids[i]`` is added into row ``ids[i]``
    (``index_add_``, chunk by chunk): per-cluster sums measured from the current centroid,
    so their fp32 rounding scales with the spread of the cluster, not with its magnitude
    and size (plain fp32 sums of 50,000 equal rows were off by 1e-3 relative).
    With ``buffers`` the returned ``ids``/``dist`` are its tensors, overwritten by the next call.
    """
    n, k = x.shape[0], centroids.shape[0]
    if buffers is None:
        buffers = _Buffers(n, k, x.shape[1], chunk, x.dtype, x.device)
    buf, scratch, ids, dist = buffers.buf, buffers.scratch, buffers.ids, buffers.dist
    exact = exact or deviations is not None
    # -2·c is exact in floating point, and folding it in up front lets addmm add ||c||²
    # as its bias (fused into the GEMM epilogue by cuBLASLt) with alpha=1.
    neg2c_t = centroids.mul(-2.0).t()
    c_sq = torch.linalg.vecdot(centroids, centroids)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        rows = _chunk_fp32(x, s, e, scratch)
        part = buf[: e - s]
        torch.addmm(c_sq, rows, neg2c_t, out=part)
        torch.min(part, dim=1, out=(dist[s:e], ids[s:e]))
        if exact:
            diff = rows - centroids.index_select(0, ids[s:e])
            torch.linalg.vector_norm(diff, dim=1, out=dist[s:e])
            dist[s:e].square_()
            if deviations is not None:
                deviations.index_add_(0, ids[s:e], diff)
    if not exact:
        # Back to true squared distances; rounding can push a zero distance slightly negative.
        dist.add_(x_sq).clamp_min_(0.0)
    return ids, dist


def assign(
    x: Tensor, centroids: Tensor, *, chunk_size: int | None = None, exact: bool = False
) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each row of ``x``: ``(ids int64 [N], squared distance float32 [N])``.

    Math is fp32 whatever the dtype of ``x`` (half input is upcast a chunk at a time). The
    distances come from ``||x||² − 2x·c + ||c||²`` (error ~1e-7 of ``||x||²``), or with
    ``exact`` from explicit differences (0 for a row equal to its centroid; ~10 % slower).
    """
    c, chunk = _assignment_inputs(x, centroids, chunk_size)
    with torch.no_grad():
        return _nearest(x, c, _sq_norms(x, chunk), chunk, exact=exact)


def _assignment_inputs(x: Tensor, centroids: Tensor, chunk_size: int | None) -> tuple[Tensor, int]:
    """Checked ``(centroids as fp32 on x's device, rows a chunk)`` for :func:`assign` and
    :func:`sample_assign`; UsageError for bad data or dimensions that do not match."""
    _check_data(x, finite=False)
    _check_data(centroids, "centroids")
    if centroids.shape[1] != x.shape[1]:
        raise UsageError(f"centroids have d={centroids.shape[1]} but the data has d={x.shape[1]}")
    c = centroids.detach().to(device=x.device, dtype=torch.float32)
    return c, chunk_size or auto_chunk_size(x.shape[0], c.shape[0], x.device)


def sample_assign(
    x: Tensor, centroids: Tensor, temperature: float, *, generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """A centroid drawn for each row of ``x``: ids int64 ``[N]``, row ``i`` taking centroid ``j``
    with probability ``softmax_j(-||x_i - c_j||² / temperature)``.

    Stochastic quantisation: near-ties become coin flips, far centroids never come up, and
    ``temperature -> 0`` gives :func:`assign`'s nearest centroid. Used to augment training
    data with the codes a slightly different input would get, in the spirit of subword
    regularisation (Kudo, 2018) for text tokenizers. ``temperature`` is in the units of the
    squared distances (features²). Drawn by the Gumbel-max trick, chunk by chunk, from
    ``generator`` (default: the global one); the same seed, device and chunking give the same ids.

    Raises:
        UsageError: ``temperature`` not positive, or dimensions that do not match.
    """
    c, chunk = _assignment_inputs(x, centroids, chunk_size)
    if not temperature > 0:
        raise UsageError(f"temperature {temperature}: must be > 0")
    with torch.no_grad():
        _sq_norms(x, chunk)  # the NaN/inf check
        neg2c_t, c_sq = c.mul(-2.0).t(), torch.linalg.vecdot(c, c)
        ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        for s in range(0, x.shape[0], chunk):
            e = min(s + chunk, x.shape[0])
            # ||x||² is the same for every centroid of a row, so it drops out of the softmax.
            logits = torch.addmm(c_sq, x[s:e].float(), neg2c_t).div_(-temperature)
            u = torch.rand(logits.shape, generator=generator, device=x.device).clamp_(min=1e-20)
            ids[s:e] = logits.sub_(u.log_().neg_().log_()).argmax(dim=1)
        return ids
