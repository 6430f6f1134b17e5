"""Fit a k-means codec: extract features from media, cluster them, write a codec directory.

Features are kept in memory while they fit in ``memory_budget`` bytes; beyond that the fit
switches to streaming (a random sample for the Lloyd iterations, then passes over the
stream), so memory stays flat in dataset size. ``feature_cache`` stores each input's
features on disk so that re-fitting with another k extracts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ..errors import DataError, TealError, UsageError
from ..features.base import FeatureExtractor

if TYPE_CHECKING:
    import torch

    from .kmeans import KMeansResult

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of fp32 features held for an in-memory fit


@dataclass
class ClusterOptions:
    """k-means settings. ``sample`` caps the rows the Lloyd iterations see (None: all, while in memory).

    ``tf32`` lets CUDA compute distances in TF32 (about 5x faster on an H100; points at a near
    tie may pick the other centroid); CPU fits are always full fp32.
    """

    k: int = 512
    iters: int = 50
    sample: int | None = None
    seed: int = 0
    image_size: int | None = None
    on_error: str = "fail"
    backend: str = "torch"
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    batch_size: int = 16
    workers: int | None = None  # loader threads (None: one per core, at most 16)
    tf32: bool = True  # CUDA only: distance matmuls in TF32 (the reported inertia stays exact fp32)


@dataclass
class ClusterReport:
    """What happened: files read and skipped, feature rows, the fit, and the codec written."""

    files: int = 0
    skipped: int = 0
    rows: int = 0
    streaming: bool = False
    result: "KMeansResult | None" = None
    directory: Path | None = None
    errors: list[str] = field(default_factory=list)


def _load(extractor: FeatureExtractor, path: str, options: ClusterOptions) -> "torch.Tensor":
    from ..media.io import check_duration, load_audio, load_image

    if extractor.modality == "image":
        return extractor.prepare(load_image(path), options.image_size)  # type: ignore[attr-defined]
    wave = load_audio(path, extractor.sample_rate)
    check_duration(wave, extractor.sample_rate, extractor.frame_rate, path, f"{extractor.kind} features",
                   extractor.min_samples)
    return wave


def _extract_batch(extractor: FeatureExtractor, media: "list[torch.Tensor]") -> "list[torch.Tensor]":
    """One extractor call per batch: audio as a list of clips, images stacked by size."""
    import torch

    with torch.inference_mode():
        if extractor.modality == "audio":
            feats = extractor.extract(media)
        else:
            feats = [None] * len(media)
            by_shape: dict[tuple, list[int]] = {}
            for i, pixels in enumerate(media):
                by_shape.setdefault(tuple(pixels.shape), []).append(i)
            for idx in by_shape.values():
                out = extractor.extract(torch.stack([media[i] for i in idx]).to(extractor.device))
                for i, f in zip(idx, out):
                    feats[i] = f
    return [f.reshape(-1, f.shape[-1]).float() for f in feats]


def iter_features(items: Iterable[tuple[str, str]], extractor: FeatureExtractor, options: ClusterOptions,
                  report: ClusterReport, cache=None, warn: Callable[[str], None] | None = None,
                  count: bool = True) -> Iterator["torch.Tensor"]:
    """Features of each ``(id, path)`` in order, from the cache when it has them.

    Three stages overlap: files of batch N+1 are decoded in a thread pool while batch N is
    extracted, and batch N-1 (N-2 on a GPU) is checked (NaN/inf) and handed out only once
    batch N has been launched, so a GPU extractor is not left idle waiting for the host.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..pipeline.prefetch import batched, pipeline

    def start(pool, chunk):
        jobs = []
        for key, path in chunk:
            hit = cache.get(key) if cache is not None else None
            jobs.append((key, hit, None if hit is not None else pool.submit(_load, extractor, path, options)))
        return jobs

    def launch(jobs):
        loaded, failed = [], {}
        for key, hit, job in jobs:
            if job is None:
                continue
            try:
                loaded.append((key, job.result()))
            except TealError as exc:
                if options.on_error == "fail":
                    raise
                failed[key] = str(exc)
        feats = _extract_batch(extractor, [m for _, m in loaded]) if loaded else []
        return jobs, failed, dict(zip((k for k, _ in loaded), feats)), _finite_flags(feats)

    def emit(state) -> Iterator["torch.Tensor"]:
        jobs, failed, extracted, finite = state
        for key, ok in zip(extracted, finite()):
            if not ok:
                raise DataError(f"{key}: {extractor.kind} features contain NaN or infinite values "
                                "(a broken checkpoint, or an overflow in half precision: try --dtype float32)")
        for key, hit, _ in jobs:
            if key in failed:
                if count:
                    report.skipped += 1
                    report.errors.append(failed[key])
                    if warn is not None:
                        warn(f"skipped: {failed[key]}")
                continue
            feats = hit if hit is not None else extracted[key]
            if hit is None and cache is not None:
                cache.put(key, feats)
            if count:
                report.files += 1
                report.rows += feats.shape[0]
            yield feats

    from ..pipeline.loaders import default_workers

    # Decoding releases the GIL (soundfile, soxr, PIL), so threads scale with cores: a 10 s
    # FLAC clip takes ~1.9 ms of a core, and an H100 running Whisper-small asks ~2,000 a second.
    with ThreadPoolExecutor(max_workers=options.workers or default_workers(), thread_name_prefix="teal-load") as pool:
        # Two batches in flight on a GPU: host jitter (file reads, Python) then does not idle it.
        depth = 2 if getattr(extractor.device, "type", "cpu") == "cuda" else 1
        yield from pipeline(batched(items, options.batch_size), lambda chunk: start(pool, chunk), launch, emit, depth)


FINITE_CHECK_ONCE = 1 << 26  # elements: batches up to this size (256 MB fp32) are checked in one copy


def _finite_flags(feats: "list[torch.Tensor]") -> Callable[[], list[bool]]:
    """Whether each tensor is all finite, read later without stalling the device.

    A batch is checked as one tensor (3 kernels where a check per clip launched 2 per clip
    and a stack); only when that fails, or for a batch too big to copy, is each clip checked."""
    import torch

    from ..runtime.device import host_copy_later

    if not feats:
        return list

    def each() -> "torch.Tensor":
        return torch.stack([f.isfinite().all() for f in feats])

    if sum(f.numel() for f in feats) > FINITE_CHECK_ONCE:
        flags = host_copy_later(each())
        return lambda: flags().tolist()
    every = host_copy_later(torch.cat([f.reshape(-1) for f in feats]).isfinite().all())
    return lambda: [True] * len(feats) if bool(every()) else each().tolist()


def import_codec(km_path: str | Path, extractor: FeatureExtractor, output: str | Path | None) -> Path:
    """Make a codec directory from a fairseq/GSLM ``km.bin`` (sklearn KMeans pickle) fitted on
    ``extractor``'s features. The file is read without executing pickled code."""
    from ..codecs.kmeans_codec import codec_name, save_codec_dir
    from .kmbin import read_centroids

    centroids = read_centroids(km_path)
    if centroids.ndim != 2 or centroids.shape[1] != extractor.dim:
        raise DataError(f"{km_path}: centroids of shape {list(centroids.shape)} do not fit {extractor.kind} "
                        f"features of dim {extractor.dim} (wrong --features or --layer?)")
    out = Path(output) if output else Path("codecs") / codec_name(extractor, int(centroids.shape[0]))
    return save_codec_dir(out, extractor, centroids, {"fit": {"imported_from": str(km_path)}})


def _distinct_rows(centroids: "torch.Tensor") -> int:
    """Number of distinct rows of ``centroids`` ([k, d]); k-means gives equal centroids only
    when the data has fewer than k distinct points (clusters left empty keep a copy)."""
    import torch

    return int(torch.unique(centroids.cpu(), dim=0).shape[0])


def fit_codec(items: list[tuple[str, str]], extractor: FeatureExtractor, output: str | Path | None,
              options: ClusterOptions, *, device: Any = "cpu", cache=None,
              warn: Callable[[str], None] | None = None,
              progress: Callable[[int, float], None] | None = None) -> ClusterReport:
    """Fit ``options.k`` centroids on the features of ``items`` and save the codec.

    ``output`` is the codec directory (default: ``codecs/<name>``, the name recording the
    extractor and k). Returns a report; raises if no features were extracted.
    """
    import torch

    from ..codecs.kmeans_codec import codec_name, save_codec_dir
    from .kmeans import kmeans_streaming

    if options.k < 1:
        raise UsageError(f"--k {options.k}: must be >= 1")
    if options.sample is not None and options.sample < options.k:
        raise UsageError(f"--sample {options.sample} is smaller than --k {options.k}: the fit needs at least k "
                         f"vectors; raise --sample to {options.k} or more, or lower --k")
    if not items:
        raise UsageError(f"no {extractor.modality} files among the inputs")
    extractor.to(device)
    report = ClusterReport()
    held: list[torch.Tensor] = []
    held_bytes = 0
    for feats in iter_features(items, extractor, options, report, cache, warn):
        held.append(feats)
        held_bytes += feats.numel() * 4
        if held_bytes > options.memory_budget:
            report.streaming = True
            break
    if report.rows == 0:
        raise DataError("no features were extracted: every input failed or was empty")

    if not report.streaming:
        x = torch.cat(held).to(device)
        del held
        report.result = _fit_in_memory(x, options, progress)
    else:
        del held
        # Streaming: the stream is re-read on every pass (from the cache when one is given);
        # files, rows and skips are counted on the first read only.
        report.files = report.rows = report.skipped = 0
        report.errors.clear()
        reads = 0

        def batches() -> Iterator[torch.Tensor]:
            nonlocal reads
            reads += 1
            return iter_features(items, extractor, options, report, cache, warn, count=reads == 1)

        report.result = kmeans_streaming(batches, options.k, sample=options.sample, iters=options.iters,
                                         seed=options.seed, device=device, progress=progress,
                                         allow_tf32=options.tf32)

    distinct = _distinct_rows(report.result.centroids)
    if distinct < options.k and warn is not None:
        warn(f"only {distinct} distinct centroids for --k {options.k}: the features hold fewer than {options.k} "
             f"distinct vectors, so {options.k - distinct} ids duplicate others and are never produced; "
             f"use --k {distinct} or more varied data")
    out = Path(output) if output else Path("codecs") / codec_name(extractor, options.k)
    report.directory = save_codec_dir(out, extractor, report.result.centroids,
                                      _provenance(report, options, device, distinct))
    return report


def _fit_in_memory(x: "torch.Tensor", options: ClusterOptions, progress) -> "KMeansResult":
    """k-means on every held feature vector ``x`` ([N, d]), or on ``options.sample`` of them
    (the inertia then measured on all of them)."""
    import torch

    from .kmeans import assign, kmeans

    if x.shape[0] < options.k:
        raise UsageError(f"--k {options.k} is larger than the {x.shape[0]} feature vectors extracted; lower --k or add data")
    fit_x = x
    if options.sample is not None and options.sample < x.shape[0]:
        gen = torch.Generator(device="cpu").manual_seed(options.seed)
        fit_x = x[torch.randperm(x.shape[0], generator=gen)[: options.sample].to(x.device)]
    result = kmeans(fit_x, options.k, iters=options.iters, seed=options.seed, backend=options.backend,
                    progress=progress, allow_tf32=options.tf32)
    if fit_x is not x:
        result.inertia = float(assign(x, result.centroids, exact=True)[1].double().sum())
    return result


def _provenance(report: ClusterReport, options: ClusterOptions, device: Any, distinct: int) -> dict:
    """The fit's record in the codec's config."""
    import torch

    return {
        "fit": {
            "iters": options.iters,
            "iterations_run": report.result.iterations,
            "seed": options.seed,
            "sample": options.sample,
            "files": report.files,
            "vectors": report.rows,
            "inertia": report.result.inertia,
            "mean_sq_error": report.result.inertia / max(report.rows, 1),
            "backend": report.result.backend,
            "tf32": options.tf32 and torch.device(device).type == "cuda",
            "streaming": report.streaming,
            "distinct_centroids": distinct,
        },
    }
