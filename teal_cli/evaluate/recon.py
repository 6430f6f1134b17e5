"""The ``recon`` task: how well a codec's tokens reconstruct the media they came from.

Each image or audio item of the inputs (media files, folders, manifests, as ``teal
tokenize`` reads them) is tokenized by its codec (:func:`teal_cli.pipeline.tokenize.tokenize_records`)
and decoded back (:func:`teal_cli.pipeline.detokenize.decode_segment`). Images are compared at the
codec's own geometry (the original passed through the codec's resize/crop, the
reconstruction rounded to 8 bits as ``teal detokenize`` writes it): PSNR (dB) and SSIM,
averaged over images. Audio: the log-mel distance (dB, :func:`~teal_cli.evaluate.metrics.log_mel_distance`)
between the original at the codec's sample rate and the decoded wave, averaged over clips.
Codebook usage counts every id of every item, per modality.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Iterator, Sequence

from ..codecs.base import Codec, ImageCodec
from ..errors import TealError
from ..records import Record
from . import metrics as M
from .result import EvalResult, nothing_to_score

PAIRS_KEPT = 8  # original/reconstruction pairs kept for the report


def score_recon(records: Iterable[Record], codecs: Sequence[Codec], *, batch_size: int = 16, on_error: str = "fail",
                warn: Callable[[str], None] | None = None, workers: int | None = None) -> EvalResult:
    import numpy as np

    from ..pipeline.detokenize import decode_segment
    from ..media.io import load_audio, load_image
    from ..pipeline.tokenize import TokenizeOptions, TokenizeStats, tokenize_records

    paths: dict[int, list[str | None]] = {}

    def remember(items: Iterable[Record]) -> Iterator[Record]:
        for record in items:  # tokenize_records replaces the segments in place: keep the paths
            paths[id(record)] = [s.path for s in record.segments]
            yield record

    stats = TokenizeStats()
    options = TokenizeOptions(batch_size=batch_size, on_error=on_error, workers=workers)
    by_name = {c.name: c for c in codecs}
    psnrs, ssims, mels = [], [], []
    usage: dict[str, Counter] = {}
    kept: list = []
    failed = 0
    for record in tokenize_records(remember(records), codecs, options, warn=warn, stats=stats):
        sources = paths.pop(id(record))
        for i, seg in enumerate(record.segments):
            if not seg.is_tokens or sources[i] is None or seg.codec not in by_name:
                continue
            codec = by_name[seg.codec]
            usage.setdefault(codec.modality, Counter()).update(seg.tokens)
            where = f"record '{record.id}' segment {i} ({sources[i]})"
            try:
                decoded = decode_segment(seg, codec, where)
                if isinstance(codec, ImageCodec):
                    original, _ = codec.pixel_prep().apply(load_image(sources[i]))
                    recon = np.asarray(decoded.convert("RGB"))
                    original = original[: recon.shape[0], : recon.shape[1]]
                    psnrs.append(M.psnr(original, recon))
                    ssims.append(M.ssim(original, recon))
                    if len(kept) < PAIRS_KEPT:
                        kept.append((record.id, original, recon))
                else:
                    wave = load_audio(sources[i], codec.sample_rate).numpy()
                    back, rate = decoded
                    mels.append(M.log_mel_distance(wave, back.numpy(), rate))
            except (TealError, ValueError) as exc:
                if on_error == "fail":
                    raise
                failed += 1
                if warn is not None:
                    warn(f"skipped: {where}: {exc}")
    if not psnrs and not mels:
        nothing_to_score("recon", "--data", {"records": stats.records, "skipped": stats.skipped + failed})
    metrics: dict[str, float] = {}
    if psnrs:
        metrics["psnr_db"] = float(np.mean(psnrs))
        metrics["ssim"] = float(np.mean(ssims))
    if mels:
        metrics["log_mel_distance_db"] = float(np.mean(mels))
    vocab = {c.modality: c for c in codecs}
    for modality, counts in usage.items():
        use = M.codebook_usage(counts, vocab[modality].vocab_size)
        metrics[f"{modality}_codebook_used_pct"] = use["used_pct"]
        metrics[f"{modality}_codebook_perplexity"] = use["perplexity"]
    counts = {"records": stats.records, "images": len(psnrs), "audio": len(mels), "skipped": stats.skipped + failed}
    settings = {"codecs": {c.name: {"modality": c.modality, "vocab_size": c.vocab_size} for c in codecs},
                "image_compare": "codec geometry (resize/crop), 8-bit; PSNR capped at 100 dB; SSIM Gaussian 11x11 sigma 1.5",
                "audio_compare": "80-band log-mel dB at 16 kHz (25 ms / 10 ms), floored 80 dB below the original's peak, mean |diff|"}
    return EvalResult("recon", metrics, counts, settings, figures={"pairs": kept})
