"""k-means engine: agreement with scikit-learn and faiss, exact inertia, empty clusters,
determinism, half input, streaming, distributed reduction and user errors."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from teal_cli.cluster import kmeans as km
from teal_cli.errors import DataError, UsageError
from teal_cli.cluster.kmeans import KMeansResult, kmeans, kmeans_plusplus, kmeans_streaming
from teal_cli.codecs.assign import assign, sample_assign
from helpers import require


def blobs(n: int = 2000, d: int = 16, centers: int = 12, spread: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Gaussian blobs, overlapping enough that Lloyd has real work to do."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, d, generator=g) * 3
    comp = torch.randint(centers, (n,), generator=g)
    return means[comp] + torch.randn(n, d, generator=g) * spread


def brute_force(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by explicit float64 differences: the reference for everything."""
    d2 = ((x.double()[:, None, :] - c.double()[None, :, :]) ** 2).sum(-1)
    dist, ids = d2.min(1)
    return ids, dist


def true_inertia(x: torch.Tensor, c: torch.Tensor) -> float:
    return float(brute_force(x, c)[1].sum())


# ---------------------------------------------------------------------------- correctness


def test_matches_scikit_learn_from_same_init():
    sklearn = require("sklearn.cluster")
    x = blobs()
    init = kmeans_plusplus(x, 20, generator=torch.Generator().manual_seed(1))
    ours = kmeans(x, 20, iters=15, init=init)
    ref = sklearn.KMeans(20, init=init.numpy(), n_init=1, max_iter=15, tol=0, algorithm="lloyd").fit(x.numpy())
    assert abs(ours.inertia - ref.inertia_) <= 0.005 * ref.inertia_
    ids, _ = assign(x, ours.centroids)
    assert (ids.numpy() == ref.labels_).mean() >= 0.99
    assert torch.allclose(ours.centroids, torch.from_numpy(ref.cluster_centers_), atol=1e-3)


def test_inertia_is_exact_for_returned_centroids_and_history_is_consistent():
    x = blobs(seed=2)
    r = kmeans(x, 16, iters=7, seed=0)
    assert isinstance(r, KMeansResult) and r.backend == "torch"
    assert r.centroids.shape == (16, 16) and r.centroids.dtype == torch.float32
    assert r.iterations == 7 and len(r.history) == 8
    assert r.history[-1] == r.inertia
    assert r.inertia == pytest.approx(true_inertia(x, r.centroids), rel=1e-5)
    # Lloyd never increases inertia (up to fp32 rounding).
    assert all(b <= a * (1 + 1e-6) for a, b in zip(r.history, r.history[1:]))
    assert r.history[-1] < r.history[0]


def test_assign_equals_brute_force_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(500, 8, generator=g), torch.randn(37, 8, generator=g)
    ids, dist = assign(x, c)
    ref_ids, ref_dist = brute_force(x, c)
    assert ids.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    assert torch.equal(ids, torch.cdist(x.double(), c.double()).argmin(1))
    assert torch.allclose(dist.double(), ref_dist, rtol=1e-4, atol=1e-4)
    ids7, dist7 = assign(x, c, chunk_size=7)  # chunk boundaries that do not divide N
    assert torch.equal(ids7, ids) and torch.allclose(dist7, dist)


def test_sample_assign_draws_from_the_softmax_of_negative_squared_distances():
    # One point, four centroids at squared distances 0, 1, 2 and 9: at temperature 1 the ids
    # must come up in proportion to exp(-d²), i.e. 0.59 / 0.22 / 0.08 / 0.0001.
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0**0.5], [3.0, 0.0]])
    x = torch.zeros(40_000, 2)
    ids = sample_assign(x, c, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).double() / len(ids)
    expected = torch.softmax(-torch.tensor([0.0, 1.0, 2.0, 9.0], dtype=torch.float64), 0)
    assert torch.allclose(freq, expected, atol=0.01)  # 4 standard errors at n = 40,000
    # Cold: the nearest centroid, as assign gives it.
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(500, 8, generator=g), torch.randn(37, 8, generator=g)
    assert torch.equal(sample_assign(x, c, 1e-4, generator=g), assign(x, c)[0])
    # Seeded: the same generator state gives the same ids, whatever the chunking inside a call.
    a = sample_assign(x, c, 2.0, generator=torch.Generator().manual_seed(5))
    b = sample_assign(x, c, 2.0, generator=torch.Generator().manual_seed(5))
    other = sample_assign(x, c, 2.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert (a != assign(x, c)[0]).float().mean() > 0.3  # hot enough to move many rows


def test_tol_stops_early_with_exact_inertia():
    x = blobs(spread=2.5, seed=3)
    full = kmeans(x, 10, iters=40, seed=1)
    early = kmeans(x, 10, iters=40, tol=1e-2, seed=1)
    assert early.iterations < full.iterations
    assert early.inertia == pytest.approx(true_inertia(x, early.centroids), rel=1e-5)
    assert early.inertia > full.inertia


def test_stops_at_a_fixed_point_of_lloyd():
    x = blobs(spread=2.5, seed=3)
    r = kmeans(x, 10, iters=40, seed=1)
    assert r.iterations < 40 and len(r.history) == r.iterations + 1
    # A fixed point: one more Lloyd update would give back the same centroids.
    ids, _ = brute_force(x, r.centroids)
    means = torch.zeros(10, 16, dtype=torch.float64).index_add_(0, ids, x.double()) / torch.bincount(ids)[:, None]
    assert torch.allclose(means.float(), r.centroids, atol=1e-5)
    assert torch.equal(kmeans(x, 10, iters=r.iterations, seed=1).centroids, r.centroids)


def test_incremental_sums_match_a_full_recount():
    # Many iterations on overlapping data: most updates move only the rows that changed.
    x = blobs(n=3000, spread=2.5, seed=12)
    init = kmeans_plusplus(x, 30, generator=torch.Generator().manual_seed(0))
    r = kmeans(x, 30, iters=25, init=init)
    sklearn = require("sklearn.cluster")
    ref = sklearn.KMeans(30, init=init.numpy(), n_init=1, max_iter=25, tol=0, algorithm="lloyd").fit(x.numpy())
    assert abs(r.inertia - ref.inertia_) <= 1e-4 * ref.inertia_
    assert torch.allclose(r.centroids, torch.from_numpy(ref.cluster_centers_), atol=1e-4)


def test_progress_reports_every_pass():
    seen = []
    r = kmeans(blobs(n=300), 4, iters=3, progress=lambda i, v: seen.append((i, v)))
    assert seen == list(enumerate(r.history))


# ---------------------------------------------------------------------------- empty clusters


def _data_with_unreachable_centroid():
    """Three tight blobs, one outlier, and an init whose 4th centroid no point is nearest to."""
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    blobs3 = centers.repeat_interleave(50, 0) + 0.3 * torch.randn(150, 2, generator=g)
    x = torch.cat([blobs3, torch.tensor([[30.0, 30.0]])])
    init = torch.cat([centers, torch.tensor([[1000.0, -1000.0]])])
    return x, init


def test_empty_keep_leaves_centroid_in_place():
    x, init = _data_with_unreachable_centroid()
    r = kmeans(x, 4, iters=5, init=init, empty="keep")
    assert torch.equal(r.centroids[3], init[3])
    assert torch.bincount(assign(x, r.centroids)[0], minlength=4)[3] == 0


def test_empty_reseed_moves_to_farthest_point_like_scikit_learn():
    x, init = _data_with_unreachable_centroid()
    r = kmeans(x, 4, iters=5, init=init, empty="reseed")
    # The outlier is the point farthest from its centroid, so it becomes a cluster of its own.
    assert torch.equal(r.centroids[3], x[-1])
    assert r.inertia < kmeans(x, 4, iters=5, init=init, empty="keep").inertia
    sklearn = require("sklearn.cluster")
    for iters in (1, 5):  # after one update the moved point must also have left its old cluster
        ours = kmeans(x, 4, iters=iters, init=init, empty="reseed")
        ref = sklearn.KMeans(4, init=init.numpy(), n_init=1, max_iter=iters, tol=0, algorithm="lloyd").fit(x.numpy())
        assert torch.allclose(ours.centroids, torch.from_numpy(ref.cluster_centers_), atol=1e-4)


def test_reseed_keeps_sums_counts_and_ids_consistent():
    # The next iteration updates sums incrementally from `ids`, so all three must agree.
    x, k = blobs(n=200, d=4, seed=13), 6
    ids = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(0))  # 4 and 5 empty
    dist = torch.rand(200, generator=torch.Generator().manual_seed(1))
    sums = torch.zeros(k, 4).index_add_(0, ids, x)
    counts = torch.bincount(ids, minlength=k).double()
    km._reseed_farthest(x, ids, dist, sums, counts, torch.tensor([4, 5]))
    assert torch.allclose(sums, torch.zeros(k, 4).index_add_(0, ids, x), atol=1e-5)
    assert torch.equal(counts, torch.bincount(ids, minlength=k).double())
    assert sorted(ids[dist.topk(2).indices].tolist()) == [4, 5]


# ---------------------------------------------------------------------------- determinism, dtypes


def test_deterministic_given_seed_or_generator():
    x = blobs(seed=4)
    a = kmeans(x, 12, iters=5, seed=7)
    b = kmeans(x, 12, iters=5, seed=7)
    c = kmeans(x, 12, iters=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.centroids, b.centroids) and a.history == b.history
    assert torch.equal(a.centroids, c.centroids)
    assert not torch.equal(kmeans_plusplus(x, 12, generator=torch.Generator().manual_seed(7)),
                           kmeans_plusplus(x, 12, generator=torch.Generator().manual_seed(8)))


def test_kmeans_plusplus_picks_distinct_data_rows():
    x = blobs(n=400, seed=5)
    c = kmeans_plusplus(x, 12, generator=torch.Generator().manual_seed(0))
    ids, dist = brute_force(c, x)  # every centroid is one of the rows
    assert torch.all(dist == 0) and ids.unique().numel() == 12


def test_half_input_gives_fp32_centroids_and_same_fit():
    x = blobs(seed=6).half()
    init = x[:10].float()
    r16 = kmeans(x, 10, iters=5, init=init)
    r32 = kmeans(x.float(), 10, iters=5, init=init)
    assert r16.centroids.dtype == torch.float32
    assert torch.allclose(r16.centroids, r32.centroids, atol=1e-5)
    assert r16.inertia == pytest.approx(r32.inertia, rel=1e-6)
    assert assign(x, r16.centroids)[1].dtype == torch.float32


# ---------------------------------------------------------------------------- streaming


def _stream(x: torch.Tensor, batch: int):
    return lambda: (x[s : s + batch] for s in range(0, x.shape[0], batch))


def test_streaming_close_to_in_memory_and_exact_over_all_data():
    x = blobs(n=20_000, d=8, centers=10, spread=0.5, seed=7)
    mem = kmeans(x, 10, iters=20, seed=0)
    st = kmeans_streaming(_stream(x, 1000), 10, sample=2000, iters=20, passes=2, seed=0)
    assert st.inertia == pytest.approx(true_inertia(x, st.centroids), rel=1e-5)
    assert abs(st.inertia - mem.inertia) <= 0.01 * mem.inertia
    assert len(st.history) == 3 and st.history[-1] == st.inertia


def test_streaming_sample_is_capped(monkeypatch):
    x = blobs(n=10_000, d=4, centers=3, seed=8)
    fitted_on = []
    real = km.kmeans

    def spy(data, k, **kw):
        fitted_on.append(data.shape[0])
        return real(data, k, **kw)

    monkeypatch.setattr(km, "kmeans", spy)
    kmeans_streaming(_stream(x, 500), 3, sample=700, iters=3)
    kmeans_streaming(_stream(x, 500), 2, iters=3)  # default: 256 per centroid
    assert fitted_on == [700, 512]


def test_reservoir_sample_is_uniform_over_the_stream():
    values = torch.arange(10_000, dtype=torch.float32)[:, None]
    rows, n = km._reservoir(_stream(values, 100), 1000, torch.Generator().manual_seed(0), None)
    assert n == 10_000 and rows.shape == (1000, 1)
    assert rows.unique().numel() == 1000
    # A biased reservoir (first or last rows) would put the mean far from 5000.
    assert abs(float(rows.mean()) - 5000) < 300
    assert int((rows < 5000).sum()) in range(430, 571)


# ---------------------------------------------------------------------------- distributed


def test_all_reduce_across_threads_matches_single_process():
    x = blobs(seed=9)
    init = kmeans_plusplus(x, 8, generator=torch.Generator().manual_seed(0))
    single = kmeans(x, 8, iters=6, init=init)
    world, barrier, slots, results = 2, threading.Barrier(2), [None, None], [None, None]

    def worker(rank: int) -> None:
        def all_reduce(t: torch.Tensor) -> None:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            t.copy_(total)

        results[rank] = kmeans(x[rank::world], 8, iters=6, init=init, all_reduce_fn=all_reduce)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(results[0].centroids, results[1].centroids)
    assert torch.allclose(results[0].centroids, single.centroids, atol=1e-4)
    assert results[0].inertia == pytest.approx(single.inertia, rel=1e-5)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda x: kmeans(x[:5], 6), UsageError, "larger than the number of points"),
        (lambda x: kmeans(x, 0), UsageError, "positive integer"),
        (lambda x: kmeans(x[:0], 2), DataError, "empty"),
        (lambda x: kmeans(x, 2, backend="gpu-magic"), UsageError, "unknown k-means backend"),
        (lambda x: kmeans(x, 2, empty="drop"), UsageError, "empty="),
        (lambda x: kmeans(x, 2, init=torch.zeros(3, 4)), UsageError, "init has shape"),
        (lambda x: kmeans(x, 2, all_reduce_fn=lambda t: None), UsageError, "identical on every process"),
        (lambda x: assign(x, torch.zeros(2, 5)), UsageError, "d=5"),
        (lambda x: sample_assign(x, torch.zeros(2, 4), 0.0), UsageError, "must be > 0"),
        (lambda x: sample_assign(x, torch.zeros(2, 5), 1.0), UsageError, "d=5"),
    ],
)
def test_user_errors_are_one_line(call, error, words):
    with pytest.raises(error) as info:
        call(torch.randn(20, 4))
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_is_a_data_error(bad):
    x = torch.randn(20, 4)
    x[3, 1] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        kmeans(x, 2)
    with pytest.raises(DataError, match="batch 1"):
        kmeans_streaming(_stream(x, 3), 2)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("n", [1000, 50_000])
def test_constant_data_gives_that_point_and_zero_inertia(n):
    row = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 3 + 0.1
    x = row.repeat(n, 1)
    fit = kmeans(x, 4, iters=3)
    assert torch.equal(fit.centroids, row.expand(4, -1))  # the mean of equal rows is that row
    assert fit.inertia == 0.0 and fit.history[-1] == 0.0
    assert float(assign(x, fit.centroids, exact=True)[1].sum()) == 0.0


def test_big_cluster_means_are_accurate():
    """fp32 running sums of 50,000 rows were 1e-3 off; float64 sums of deviations are not."""
    g = torch.Generator().manual_seed(4)
    x = 100.0 + torch.rand(50_000, 16, generator=g)
    fit = kmeans(x, 1, iters=1)
    torch.testing.assert_close(fit.centroids[0].double(), x.double().mean(0), rtol=1e-7, atol=0)
    assert fit.inertia == pytest.approx(float(((x.double() - x.double().mean(0)) ** 2).sum()), rel=1e-6)


def test_fewer_distinct_points_than_k_leaves_duplicates_the_argmin_never_picks():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).repeat(20, 1)
    fit = kmeans(x, 5, iters=5)
    assert torch.unique(fit.centroids, dim=0).shape[0] == 3 and fit.inertia == 0.0
    ids, _ = assign(x, fit.centroids)
    assert ids.unique().numel() == 3


# ---------------------------------------------------------------------------- faiss


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(UsageError, match="pip install faiss-cpu"):
        kmeans(torch.randn(20, 4), 2, backend="faiss")


def test_faiss_backend_agrees_with_torch():
    require("faiss")
    x = blobs(n=3000, seed=10)
    init = kmeans_plusplus(x, 12, generator=torch.Generator().manual_seed(0))
    ours = kmeans(x, 12, iters=10, init=init)
    theirs = kmeans(x, 12, iters=10, init=init, backend="faiss")
    assert theirs.backend == "faiss" and theirs.centroids.dtype == torch.float32
    assert abs(theirs.inertia - ours.inertia) <= 0.005 * ours.inertia
    assert theirs.inertia == pytest.approx(true_inertia(x, theirs.centroids), rel=1e-5)


def test_auto_is_no_longer_a_backend():
    """The choice no longer depends on a benchmark's record in the cache: torch or faiss, as asked."""
    with pytest.raises(UsageError, match="unknown k-means backend 'auto'; expected one of torch, faiss"):
        kmeans(torch.randn(20, 4), 2, backend="auto")


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree():
    x = blobs(n=3000, seed=11)
    init = kmeans_plusplus(x, 12, generator=torch.Generator().manual_seed(0))
    cpu = kmeans(x, 12, iters=8, init=init)
    gpu = kmeans(x.cuda(), 12, iters=8, init=init.cuda())
    assert gpu.centroids.device.type == "cuda"
    assert torch.equal(assign(x, cpu.centroids)[0], assign(x.cuda(), gpu.centroids)[0].cpu())
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-5)
    # Same seed, same k-means++ rows on either device (draws come from a CPU generator).
    assert torch.equal(kmeans_plusplus(x.cuda(), 12, generator=torch.Generator().manual_seed(0)).cpu(), init)
    tf32 = kmeans(x.cuda().half(), 12, iters=8, init=init.cuda(), allow_tf32=True)
    assert tf32.inertia == pytest.approx(true_inertia(x.half().float(), tf32.centroids.cpu()), rel=1e-5)


# ---------------------------------------------------------------------------- teal cluster's fit


def _patch_items(tmp_path, pixels):
    from PIL import Image

    path = tmp_path / "flat.png"
    Image.fromarray(pixels).save(path)
    return [("flat", str(path))]


def test_cluster_sample_smaller_than_k_names_both_options(tmp_path):
    import numpy as np

    from teal_cli.cluster.fit import ClusterOptions, fit_codec
    from teal_cli.features import extractor_for

    items = _patch_items(tmp_path, np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(UsageError, match=r"--sample 4 is smaller than --k 8.*raise --sample") as err:
        fit_codec(items, extractor_for("patch", patch_size=4), tmp_path / "c", ClusterOptions(k=8, sample=4, iters=2))
    assert "number of points" not in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_cluster_warns_when_fewer_distinct_vectors_than_k(tmp_path):
    import json as _json

    import numpy as np

    from teal_cli.cluster.fit import ClusterOptions, fit_codec
    from teal_cli.features import extractor_for

    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:16] = 200  # two distinct 4x4 patches
    warnings: list[str] = []
    report = fit_codec(_patch_items(tmp_path, pixels), extractor_for("patch", patch_size=4), tmp_path / "c",
                       ClusterOptions(k=8, iters=3), warn=warnings.append)
    assert len(warnings) == 1 and "only 2 distinct centroids for --k 8" in warnings[0] and "--k 2" in warnings[0]
    assert report.result.inertia == 0.0
    fit = _json.loads((tmp_path / "c" / "config.json").read_text())
    assert _json.dumps(fit).count('"distinct_centroids": 2') == 1
