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

from .errors import DataError, TealError, UsageError
from .features.base import FeatureExtractor

if TYPE_CHECKING:
    import torch

    from .kmeans import KMeansResult

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of fp32 features held for an in-memory fit


@dataclass
class ClusterOptions:
    """k-means settings. ``sample`` caps the rows the Lloyd iterations see (None: all, while in memory)."""

    k: int = 512
    iters: int = 50
    sample: int | None = None
    seed: int = 0
    image_size: int | None = None
    on_error: str = "fail"
    backend: str = "torch"
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    batch_size: int = 16


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


def _extract_one(extractor: FeatureExtractor, path: str, options: ClusterOptions) -> "torch.Tensor":
    import torch

    from .media import load_audio, load_image

    with torch.inference_mode():
        if extractor.modality == "image":
            pixels = extractor.prepare(load_image(path), options.image_size)  # type: ignore[attr-defined]
            feats = extractor.extract(pixels[None].to(extractor.device))[0]
        else:
            feats = extractor.extract([load_audio(path, extractor.sample_rate)])[0]
    return feats.reshape(-1, feats.shape[-1]).float()


def iter_features(items: Iterable[tuple[str, str]], extractor: FeatureExtractor, options: ClusterOptions,
                  report: ClusterReport, cache=None, warn: Callable[[str], None] | None = None,
                  count: bool = True) -> Iterator["torch.Tensor"]:
    """Features of each ``(id, path)``, from the cache when it has them."""
    for key, path in items:
        feats = cache.get(key) if cache is not None else None
        if feats is None:
            try:
                feats = _extract_one(extractor, path, options)
            except TealError as exc:
                if options.on_error == "fail":
                    raise
                if count:
                    report.skipped += 1
                    report.errors.append(str(exc))
                    if warn is not None:
                        warn(f"skipped: {exc}")
                continue
            if cache is not None:
                cache.put(key, feats)
        if count:
            report.files += 1
            report.rows += feats.shape[0]
        yield feats


def fit_codec(items: list[tuple[str, str]], extractor: FeatureExtractor, output: str | Path | None,
              options: ClusterOptions, *, device: Any = "cpu", cache=None,
              warn: Callable[[str], None] | None = None,
              progress: Callable[[int, float], None] | None = None) -> ClusterReport:
    """Fit ``options.k`` centroids on the features of ``items`` and save the codec.

    ``output`` is the codec directory (default: ``codecs/<name>``, the name recording the
    extractor and k). Returns a report; raises if no features were extracted.
    """
    import torch

    from .codecs.kmeans_codec import codec_name, save_codec_dir
    from .kmeans import kmeans, kmeans_streaming

    if options.k < 1:
        raise UsageError(f"--k {options.k}: must be >= 1")
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
        if x.shape[0] < options.k:
            raise UsageError(f"--k {options.k} is larger than the {x.shape[0]} feature vectors extracted; lower --k or add data")
        fit_x = x
        if options.sample is not None and options.sample < x.shape[0]:
            gen = torch.Generator(device="cpu").manual_seed(options.seed)
            fit_x = x[torch.randperm(x.shape[0], generator=gen)[: options.sample].to(x.device)]
        result = kmeans(fit_x, options.k, iters=options.iters, seed=options.seed, backend=options.backend, progress=progress)
        if fit_x is not x:
            from .kmeans import assign

            result.inertia = float(assign(x, result.centroids)[1].double().sum())
        report.result = result
    else:
        del held
        # Streaming: every pass re-reads the inputs (from the cache when one is given).
        def batches() -> Iterator[torch.Tensor]:
            return iter_features(items, extractor, options, report, cache, warn, count=False)

        report.files, report.rows = 0, 0
        for feats in iter_features(items, extractor, options, report, cache, warn):  # count rows once
            pass
        report.result = kmeans_streaming(batches, options.k, sample=options.sample, iters=options.iters,
                                         seed=options.seed, device=device, progress=progress)

    out = Path(output) if output else Path("codecs") / codec_name(extractor, options.k)
    provenance = {
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
            "streaming": report.streaming,
        },
    }
    report.directory = save_codec_dir(out, extractor, report.result.centroids, provenance)
    return report
