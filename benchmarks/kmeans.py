"""Seconds per Lloyd iteration: teal's k-means against scikit-learn, faiss, a plain torch loop
and a bare matmul floor, on the same data from the same initial centroids, in one run.

    python benchmarks/kmeans.py                      # CPU: 50,000 x 768, k=1024
    python benchmarks/kmeans.py --gpu-case           # CUDA: 1,000,000 x 768, k=2048
    python benchmarks/kmeans.py --n 20000 --k 256 --iters 5

Every method gets one warm-up fit of one iteration, then ``--repeat`` rounds of timed fits
of ``--iters`` iterations, the methods alternating (reversed every other round, so load from
other processes falls on all of them alike), of which each method's fastest counts.
"passes" is how many assignment passes the timed fit makes: teal and
scikit-learn measure the inertia of their final centroids with one extra pass (it is in
their time); faiss and the plain loop do not, so their inertia is measured afterwards,
untimed. On CUDA scikit-learn and faiss are skipped and TF32 variants are added.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from teal_cli.cluster import kmeans as engine  # noqa: E402
from teal_cli.cluster.kmeans import _cuda_tf32, kmeans, kmeans_plusplus  # noqa: E402
from teal_cli.codecs.assign import assign, auto_chunk_size  # noqa: E402

INIT_SAMPLE = 10_000


def make_data(n: int, d: int, k: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian mixture with k components of varied size and spread, and the shared init.

    The init is greedy k-means++ on a 10,000-row sample: random rows would leave many
    components uncovered, and then the fits differ mostly by how each method refills empty
    clusters (faiss splits big ones, teal and scikit-learn take far points), not by speed.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g)  # overlapping, so Lloyd is still moving after 10 iterations
    scales = 0.5 + torch.rand(k, generator=g)
    weights = torch.rand(k, generator=g) + 0.2
    comp = torch.multinomial(weights, n, replacement=True, generator=g)
    x = torch.empty(n, d)
    step = 100_000  # build in slices so the noise temporaries stay small
    for s in range(0, n, step):
        c = comp[s : s + step]
        x[s : s + step] = means[c] + torch.randn(c.numel(), d, generator=g) * scales[c, None]
    x = x.to(device)
    sample = x[torch.randperm(n, generator=g)[: max(k, min(n, INIT_SAMPLE))].to(device)]
    init = kmeans_plusplus(sample, k, generator=g)
    return x, init


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def exact_inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    _, dist = assign(x, centroids.to(x.device))
    return float(dist.sum(dtype=torch.float64))


def run_teal(x, init, iters, tf32=False):
    """teal's fit, with the time of each assignment pass (progress runs after its sync)."""
    stamps = []
    result = kmeans(x, init.shape[0], iters=iters, init=init, backend="torch", allow_tf32=tf32,
                    progress=lambda i, v: stamps.append(time.perf_counter()))
    result.stamps = stamps
    return result


def lloyd_seconds(result) -> float:
    """Median time between two assignment passes: one centroid update plus one pass."""
    gaps = sorted(b - a for a, b in zip(result.stamps, result.stamps[1:]))
    return gaps[len(gaps) // 2] if gaps else float("nan")


def run_plain_loop(x, init, iters, tf32=False):
    """What a first torch version looks like: cdist per chunk, argmin, update per cluster."""
    c = init.clone()
    k = c.shape[0]
    chunk = auto_chunk_size(x.shape[0], k, x.device)
    with _cuda_tf32(tf32, x.device):
        for _ in range(iters):
            ids = torch.cat([torch.cdist(x[s : s + chunk], c).argmin(1) for s in range(0, x.shape[0], chunk)])
            sums = torch.zeros_like(c).index_add_(0, ids, x)
            counts = torch.bincount(ids, minlength=k)
            c = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], c)
    return c


def run_floor(x, init, iters, tf32=False):
    """One x @ cᵀ per iteration into a preallocated output: the matmul alone."""
    k = init.shape[0]
    if x.shape[0] * k * 4 <= 8 << 30:
        out = torch.empty(x.shape[0], k, device=x.device)
        with _cuda_tf32(tf32, x.device):
            for _ in range(iters):
                torch.mm(x, init.t(), out=out)
        return
    chunk = auto_chunk_size(x.shape[0], k, x.device)
    out = torch.empty(chunk, k, device=x.device)
    with _cuda_tf32(tf32, x.device):
        for _ in range(iters):
            for s in range(0, x.shape[0], chunk):
                rows = x[s : s + chunk]
                torch.mm(rows, init.t(), out=out[: rows.shape[0]])


def run_sklearn(x, init, iters):
    from sklearn.cluster import KMeans

    km = KMeans(init.shape[0], init=init.numpy(), n_init=1, max_iter=iters, tol=0, algorithm="lloyd")
    return km.fit(x.numpy())


def run_faiss(x, init, iters):
    import faiss

    km = faiss.Kmeans(x.shape[1], init.shape[0], niter=iters, seed=0, verbose=False,
                      max_points_per_centroid=x.shape[0], min_points_per_centroid=1)
    km.train(x.numpy(), init_centroids=init.numpy())
    return torch.from_numpy(km.centroids.copy())


class Method(NamedTuple):
    fit: Callable[[int], object]  # iters -> result
    passes: Callable[[object], int]  # assignment passes that result took
    inertia: Callable[[object], float]  # inertia of its final centroids


def build_methods(x, init, iters: int, device: torch.device, skip: set[str]) -> dict[str, Method]:
    measured = lambda c: exact_inertia(x, c)  # noqa: E731 (untimed, for those that do not report it)
    fixed = lambda _: iters  # noqa: E731
    teal = lambda tf32: Method(lambda it: run_teal(x, init, it, tf32), lambda r: len(r.history),  # noqa: E731
                               lambda r: r.inertia)
    methods = {"teal": teal(False)}
    if device.type == "cuda":
        methods["teal tf32"] = teal(True)
        if "loop" not in skip:
            methods["plain loop tf32"] = Method(lambda it: run_plain_loop(x, init, it, True), fixed, measured)
    else:
        if "sklearn" not in skip and importable("sklearn"):
            methods["scikit-learn"] = Method(lambda it: run_sklearn(x, init, it), lambda r: r.n_iter_ + 1,
                                             lambda r: float(r.inertia_))
        if "faiss" not in skip and importable("faiss"):
            methods["faiss"] = Method(lambda it: run_faiss(x, init, it), fixed, measured)
    if "loop" not in skip:
        methods["plain torch loop"] = Method(lambda it: run_plain_loop(x, init, it), fixed, measured)
    if "floor" not in skip:
        methods["matmul floor"] = Method(lambda it: run_floor(x, init, it), fixed, lambda _: float("nan"))
        if device.type == "cuda":
            methods["matmul floor tf32"] = Method(lambda it: run_floor(x, init, it, True), fixed, lambda _: float("nan"))
    return methods


def importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        print(f"{name} not installed: skipped", file=sys.stderr)
        return False
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-case", action="store_true", help="preset: --n 1000000 --d 768 --k 2048 --device cuda")
    p.add_argument("--repeat", type=int, default=3, help="timed fits per method; the fastest counts")
    p.add_argument("--skip", default="", help="comma-separated methods to leave out (sklearn,faiss,loop,floor)")
    p.add_argument("--breakdown", action="store_true", help="time the parts of one teal pass instead")
    a = p.parse_args(argv)
    if a.gpu_case:
        a.n, a.d, a.k, a.device = 1_000_000, 768, 2048, "cuda"
    device = torch.device(a.device)
    skip = set(filter(None, a.skip.split(",")))

    t0 = time.perf_counter()
    x, init = make_data(a.n, a.d, a.k, a.seed, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"n={a.n} d={a.d} k={a.k} iters={a.iters} on {name}, torch {torch.__version__} "
          f"(data + init {time.perf_counter() - t0:.1f} s)")
    if a.breakdown:
        return breakdown(x, init, device)

    methods = build_methods(x, init, a.iters, device, skip)
    for m in methods.values():
        m.fit(1)  # warm-up: thread pools, kernels, allocator
    best: dict[str, tuple[float, object]] = {}
    for r in range(a.repeat):
        order = list(methods.items()) if r % 2 == 0 else list(methods.items())[::-1]
        for name, m in order:
            t = timed(lambda: m.fit(a.iters), device)
            if name not in best or t[0] < best[name][0]:
                best[name] = t
            print(f"  round {r + 1} {name}: {t[0]:.2f} s", file=sys.stderr, flush=True)
    rows, lloyd = [], {}
    for name, m in methods.items():
        seconds, result = best[name]
        rows.append((name, seconds, m.passes(result), m.inertia(result)))
        if name.startswith("teal"):
            lloyd[name] = lloyd_seconds(result)

    teal_s, teal_inertia = rows[0][1] / a.iters, rows[0][3]
    print(f"{'method':<18} {'s/iter':>9} {'s/pass':>9} {'passes':>6} {'inertia':>16} {'time/teal':>9} {'inertia/teal':>12}")
    for name, seconds, passes, inertia in rows:
        per = seconds / a.iters
        print(f"{name:<18} {per:9.4f} {seconds / passes:9.4f} {passes:6d} {inertia:16.8g} {per / teal_s:9.2f} "
              f"{inertia / teal_inertia:12.5f}")
    for name, sec in lloyd.items():
        print(f"{name}: {sec:.4f} s per Lloyd iteration (update + pass, median between passes, final pass excluded)")


def breakdown(x: torch.Tensor, init: torch.Tensor, device: torch.device) -> None:
    """Milliseconds for the parts of one assignment pass, per chunk size and precision."""
    k = init.shape[0]
    x_sq = engine._sq_norms(x, x.shape[0])
    sums = torch.zeros(k, x.shape[1], device=device)
    neg2c_t, c_sq = init.mul(-2).t(), torch.linalg.vecdot(init, init)

    def best_ms(fn, reps=3):
        fn()
        return 1000 * min(timed(fn, device)[0] for _ in range(reps))

    budgets = [256 << 20, 1 << 30, 4 << 30] if device.type == "cuda" else [4 << 20, 16 << 20, 64 << 20]
    for tf32 in (False, True) if device.type == "cuda" else (False,):
        for budget in budgets:
            chunk = max(1, min(x.shape[0], budget // (4 * k)))
            buf = torch.empty(chunk, k, device=device)
            vals = torch.empty(x.shape[0], device=device)
            ids = torch.empty(x.shape[0], dtype=torch.int64, device=device)

            def parts(with_min: bool, with_add: bool, bias: bool = True):
                for s in range(0, x.shape[0], chunk):
                    rows, part = x[s : s + chunk], buf[: min(chunk, x.shape[0] - s)]
                    if bias:
                        torch.addmm(c_sq, rows, neg2c_t, out=part)
                    else:
                        torch.mm(rows, neg2c_t, out=part)
                    if with_min:
                        torch.min(part, 1, out=(vals[s : s + chunk], ids[s : s + chunk]))
                    if with_add:
                        sums.index_add_(0, ids[s : s + chunk], rows)

            with _cuda_tf32(tf32, device):
                row = {
                    "mm": best_ms(lambda: parts(False, False, bias=False)),
                    "addmm": best_ms(lambda: parts(False, False)),
                    "+min": best_ms(lambda: parts(True, False)),
                    "+index_add": best_ms(lambda: parts(True, True)),
                    "_nearest": best_ms(lambda: engine._nearest(x, init, x_sq, chunk, sums)),
                }
            print(f"tf32={tf32!s:<5} chunk={chunk:>7} " + "  ".join(f"{n} {v:7.2f} ms" for n, v in row.items()))
    ids = assign(x, init)[0]
    print(f"index_add_ alone {best_ms(lambda: sums.index_add_(0, ids, x)):.2f} ms, "
          f"bincount {best_ms(lambda: torch.bincount(ids, minlength=k)):.2f} ms, "
          f"x_sq {best_ms(lambda: engine._sq_norms(x, x.shape[0])):.2f} ms")


if __name__ == "__main__":
    main()
