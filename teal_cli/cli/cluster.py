"""teal cluster: fit a k-means codec over image patches, log-mel frames or speech-model features."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import (DeviceOpt, DtypeOpt, Log, OnErrorOpt, QuietOpt, SeedOpt, VerboseOpt, WorkersOpt, check_choice,
                     handle_errors, setup_torch)

HELP = """Fit a k-means codec and write it as a codec directory.

The directory (config.json + centroids.safetensors) is named after its provenance, e.g.
codecs/patch-p4-k512 or codecs/whisper-small-l11-k2048, and works as --codec anywhere.

\b
Examples:
  teal cluster photo.jpg --features patch --patch-size 4 --k 512
  teal cluster digits/ --features patch --patch-size 2 --k 64 -o codecs/digits-patch-p2-k64
  teal cluster speech/ --features mel --k 256 --iters 30
  teal cluster speech/*.flac --features whisper-small --layer 11 --k 2048 --features-cache feats/
  teal cluster --import-km km.bin --features hubert-base-ls960 --layer 6     # a GSLM/fairseq k-means
  teal cluster speech/ --features mel --k 256 --export-km mel-k256.km.bin
"""


@handle_errors
def cluster(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Media files, folders, .jsonl manifests, or - for stdin.", show_default=False)] = None,
    features: Annotated[str, typer.Option("--features", "-f", help="patch, mel, or a speech model (whisper-small, hubert-base-ls960, ...).")] = "patch",
    k: Annotated[int, typer.Option("--k", "-k", help="Number of centroids (the codec's vocabulary size).", min=1)] = 512,
    iters: Annotated[int, typer.Option("--iters", help="Lloyd iterations.", min=1)] = 50,
    sample: Annotated[Optional[int], typer.Option("--sample", help="Fit on at most this many feature vectors (random sample).", min=1)] = None,
    patch_size: Annotated[int, typer.Option("--patch-size", help="patch: side of the square pixel patches.", min=1)] = 4,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="patch: resize images to this square size first.", min=1)] = None,
    n_mels: Annotated[int, typer.Option("--n-mels", help="mel: 80 or 128 mel bands.")] = 80,
    stack: Annotated[int, typer.Option("--stack", help="mel: join this many 10 ms frames into one vector (100/N ids a second).", min=1)] = 1,
    layer: Annotated[Optional[str], typer.Option("--layer", help="speech models: encoder layer (1..depth, or 'final').")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="speech models: local checkpoint file or folder.")] = None,
    features_cache: Annotated[Optional[str], typer.Option("--features-cache", help="Folder caching extracted features, reused across k sweeps.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="k-means backend: torch, or faiss (if installed; CPU only).")] = "torch",
    tf32: Annotated[bool, typer.Option("--tf32/--exact-fp32", help="CUDA k-means distances in TF32 (~5x faster; inertia still reported in fp32) or full fp32.")] = True,
    import_km: Annotated[Optional[str], typer.Option("--import-km", help="Make the codec from a GSLM/fairseq km.bin (sklearn KMeans) instead of fitting.")] = None,
    export_km: Annotated[Optional[str], typer.Option("--export-km", help="Also write the centroids as a GSLM/fairseq km.bin.")] = None,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Codec directory to write (default codecs/<name>).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Media files extracted together (speech models: also 30 s windows per encoder forward).", min=1)] = 16,
    workers: WorkersOpt = None,
    on_error: OnErrorOpt = "fail",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from ..cluster.fit import ClusterOptions, fit_codec
    from ..errors import UsageError
    from ..features import extractor_for
    from ..media.inputs import iter_media_paths, stdin_or_usage_error

    log = Log(quiet, verbose)
    check_choice(on_error, ("fail", "skip"), "--on-error")
    check_choice(backend, ("torch", "faiss"), "--backend")
    dev, dt = setup_torch(device, dtype, seed)
    options = {"patch_size": patch_size, "image_size": image_size, "n_mels": n_mels, "layer": layer,
               "stack": stack if stack != 1 else None,
               "checkpoint": checkpoint, "dtype": dt, "device": dev, "batch_size": batch_size}
    if stack != 1 and not features.startswith("mel"):
        raise UsageError(f"--stack {stack}: only mel features stack frames (got --features {features})")
    extractor = extractor_for(features, **{key: v for key, v in options.items() if v is not None})
    if import_km:
        from ..cluster.fit import import_codec

        if inputs:
            raise UsageError("--import-km takes no media inputs: the centroids come from the file")
        directory = import_codec(import_km, extractor, output)
        _export(export_km, directory)
        log.info(f"imported {import_km} as {directory}")
        print(directory)
        return
    sources = stdin_or_usage_error(inputs or [])
    items = list(iter_media_paths(sources, extractor.modality))
    cache = None
    if features_cache:
        from ..cluster.feature_cache import FeatureCache

        cache = FeatureCache(features_cache, extractor)
    opts = ClusterOptions(k=k, iters=iters, sample=sample, seed=seed, image_size=image_size, on_error=on_error,
                          backend=backend, tf32=tf32, batch_size=batch_size, workers=workers)
    log.info(f"extracting {features} features from {len(items)} file(s) on {dev}")
    with log.progress("k-means", total=iters) as advance:
        report = fit_codec(items, extractor, output, opts, device=dev, cache=cache, warn=log.warn,
                           progress=lambda it, inertia: advance())
    result = report.result
    log.info(f"{report.rows} vectors from {report.files} file(s); k={k}, {result.iterations} iterations, "
             f"inertia {result.inertia:.6g} (mean squared error {result.inertia / report.rows:.6g}); "
             f"wrote {report.directory}")
    if cache is not None:
        log.debug(f"feature cache: {cache.hits} hit(s), {cache.misses} miss(es)")
    _export(export_km, report.directory)
    print(report.directory)
    if report.skipped:
        raise typer.Exit(1)


def _export(path: Optional[str], directory) -> None:
    if path:
        from ..codecs.kmeans_codec import load_codec_dir
        from ..cluster.kmbin import write_km

        write_km(path, load_codec_dir(directory).centroids)
