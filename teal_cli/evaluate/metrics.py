"""The metrics, each a thin call into the library that defines it.

- caption: BLEU-1..4 and CIDEr-D by the COCO caption evaluation's own scorers
  (``pycocoevalcap.bleu.Bleu``, ``pycocoevalcap.cider.Cider``; pure Python), on text
  tokenised by :func:`~teal_cli.evaluate.text.coco_tokenize` instead of the Java PTB
  tokenizer; sacreBLEU's corpus BLEU (``sacrebleu.metrics.BLEU``, default 13a
  tokenisation) on the untouched text.
- WER / CER: ``jiwer.wer`` / ``jiwer.cer`` (corpus level: total edits / total reference
  words or characters).
- PSNR / SSIM: ``skimage.metrics`` (SSIM with Wang et al. 2004's Gaussian window).
- confusion matrices: ``sklearn.metrics.confusion_matrix``.
- log-mel distance, codebook usage and perplexity are written here (a few lines of numpy
  each; no library defines them in the form reported).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

PSNR_CAP_DB = 100.0  # identical images: PSNR is infinite; reported as this


def coco_caption_scores(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
                        tokenize: bool = True) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D as the COCO caption evaluation computes them.

    ``references`` maps an id to its reference captions (one or more), ``hypotheses`` the
    same ids to one caption each. With ``tokenize`` both go through
    :func:`~teal_cli.evaluate.text.coco_tokenize` first (the COCO pipeline's PTB step);
    without, they are scored as given (already tokenised text). BLEU uses the "closest"
    reference length, as ``pycocoevalcap.bleu.Bleu`` does; CIDEr-D its IDF over these
    references, so it depends on the whole set scored together.

    Returns ``{"bleu_1".."bleu_4": [0, 1], "cider_d": >= 0 (COCO's scale, x10)}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from .text import coco_tokenize

    prep = coco_tokenize if tokenize else (lambda s: s)
    gts = {k: [prep(r) for r in refs] for k, refs in references.items()}
    res = {k: [prep(hypotheses[k])] for k in references}
    if not gts:
        return {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "cider_d": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print with verbose > 0; stdout is ours
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["cider_d"] = float(cider)
    return out


def sacrebleu_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (0-100) and its signature; ``references[i]`` are the references
    of ``hypotheses[i]`` (their count may vary: shorter lists are padded with None, which
    sacreBLEU ignores)."""
    from sacrebleu.metrics import BLEU

    width = max((len(r) for r in references), default=1)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), streams)
    return float(score.score), str(metric.get_signature())


def wer_cer(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[float, float]:
    """Corpus WER and CER by jiwer (edits / reference words, edits / reference characters)."""
    import jiwer

    return float(jiwer.wer(list(references), list(hypotheses))), float(jiwer.cer(list(references), list(hypotheses)))


def accuracy(correct: Sequence[bool]) -> float:
    """Fraction correct. Raises ValueError for no items (an accuracy of nothing is no number)."""
    if not correct:
        raise ValueError("accuracy of no items")
    return sum(bool(c) for c in correct) / len(correct)


def confusion(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """``matrix[i][j]``: items of class ``labels[i]`` predicted as ``labels[j]`` (scikit-learn)."""
    from sklearn.metrics import confusion_matrix

    if not truth:
        return [[0] * len(labels) for _ in labels]
    return confusion_matrix(list(truth), list(predicted), labels=list(labels)).tolist()


def psnr(original: "np.ndarray", reconstruction: "np.ndarray") -> float:
    """PSNR in dB of two uint8 images of one shape (peak 255), capped at :data:`PSNR_CAP_DB`."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(original, reconstruction):
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, float(peak_signal_noise_ratio(original, reconstruction, data_range=255)))


def ssim(original: "np.ndarray", reconstruction: "np.ndarray") -> float:
    """Mean SSIM of two ``[H, W, 3]`` uint8 images, channels averaged.

    Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, population covariances, K1 0.01,
    K2 0.03, peak 255 (``skimage.metrics.structural_similarity`` with those settings). Images
    smaller than 11 pixels a side use a uniform window of the largest odd size that fits
    (at least 3); smaller than 3 raise ValueError.
    """
    from skimage.metrics import structural_similarity

    side = min(original.shape[:2])
    if side >= 11:
        kwargs = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    elif side >= 3:
        kwargs = {"win_size": side if side % 2 else side - 1, "use_sample_covariance": False}
    else:
        raise ValueError(f"SSIM needs images at least 3 pixels a side, got {original.shape[:2]}")
    return float(structural_similarity(original, reconstruction, channel_axis=2, data_range=255, **kwargs))


def log_mel_db(wave: "np.ndarray", sample_rate: int) -> "np.ndarray":
    """``[80, frames]`` log-mel power in dB: Whisper's 25 ms Hann window, 10 ms hop and Slaney
    mel filters at 16 kHz (:mod:`teal_cli.media.logmel`), the wave resampled there first."""
    import numpy as np
    import torch

    from ..media import logmel as audio
    from ..media.io import resample

    if sample_rate != audio.SAMPLE_RATE:
        wave = resample(np.asarray(wave, dtype=np.float32), sample_rate, audio.SAMPLE_RATE)
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if x.numel() <= audio.N_FFT // 2:
        x = torch.nn.functional.pad(x, (0, audio.N_FFT // 2 + 1 - x.numel()))
    spec = torch.stft(x, audio.N_FFT, audio.HOP_LENGTH, window=torch.hann_window(audio.N_FFT), return_complex=True)
    mel = audio.mel_filters(audio.N_MELS) @ (spec.abs() ** 2)
    return (10.0 * torch.log10(mel.clamp(min=1e-10))).numpy()


def log_mel_distance(original: "np.ndarray", reconstruction: "np.ndarray", sample_rate: int,
                     floor_db: float = 80.0) -> float:
    """Mean absolute difference, in dB, of the log-mel spectrograms (:func:`log_mel_db`) of two
    mono waves, over the frames both have; both are floored at ``floor_db`` below the
    original's peak, so that silence does not dominate. 0 for identical waves."""
    import numpy as np

    a, b = log_mel_db(original, sample_rate), log_mel_db(reconstruction, sample_rate)
    n = min(a.shape[1], b.shape[1])
    floor = a.max() - floor_db
    a, b = np.maximum(a[:, :n], floor), np.maximum(b[:, :n], floor)
    return float(np.abs(a - b).mean()) if n else 0.0


def codebook_usage(counts: Mapping[int, int], vocab_size: int) -> dict[str, float]:
    """How a codec's ids are used over a set: ``used_pct`` (distinct ids / vocab_size x 100)
    and ``perplexity`` (exp of the entropy, in nats, of the id frequencies: 1 when one id is
    used, vocab_size when all are used equally)."""
    total = sum(counts.values())
    if not total:
        return {"used_pct": 0.0, "perplexity": 0.0, "tokens": 0}
    entropy = -sum(c / total * math.log(c / total) for c in counts.values() if c)
    return {"used_pct": 100.0 * sum(1 for c in counts.values() if c) / vocab_size, "perplexity": math.exp(entropy),
            "tokens": total}


def perplexity(total_loss: float, tokens: int) -> float:
    """exp(mean per-token loss in nats); NaN-free: 0 tokens give 0.0."""
    return math.exp(total_loss / tokens) if tokens else 0.0
