"""The ``speech-gen`` task: speech a model wrote (text -> speech, image -> speech), judged.

Each prediction's first audio segment is decoded by its codec (a ``mel`` codec through
Griffin-Lim, :func:`teal_cli.pipeline.detokenize.decode_segment`) into a 16 kHz waveform, then judged:

- by a **spoken-word judge** (``--judge FILE.npz``, :class:`SpeechJudge`): a linear classifier
  over pooled log-mel statistics of the clip (:func:`speech_features`). Accuracy overall and
  per class against the reference's class (its ``"class"`` / ``"label"`` key, else the
  judge's class word in its ``"transcript"`` or prompt text);
- or by an **ASR judge** (``--asr-judge DIR``, :class:`WhisperJudge`): a local Whisper
  checkpoint in the Hugging Face folder format (``config.json``, weights, tokenizer and
  preprocessor files, as ``save_pretrained`` writes them) transcribes each clip greedily;
  WER and CER are jiwer's corpus scores (:func:`~teal_cli.evaluate.metrics.wer_cer`) of the
  transcripts against the reference text (its ``"transcript"`` key, else the prompt's
  text), both ASR-normalised (:func:`~teal_cli.evaluate.text.asr_normalize`), as TTS output
  is usually scored.

Also measured: how each segment ended (``closed``: the model wrote ``</aud>``; ``capped``:
it reached ``max_audio_seconds`` and the grammar closed it; the fraction closed is
``closed_fraction``), and the generated durations against the references' (the reference's
target audio segment: ids / frame rate). A prediction without an audio segment counts as
wrong (``no_audio``).

Judge files are ``.npz`` archives read with ``numpy.load(allow_pickle=False)``. Arrays:
``coef`` ``[C, F]``, ``intercept`` ``[C]``, ``classes`` unicode ``[C]``, ``mean`` / ``scale``
``[F]`` (standardisation), ``n_mels`` int, ``kind`` unicode (``"speech"``; image judges lack
it), optional ``test_accuracy``. ``F = 5 * n_mels`` (:func:`speech_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import DataError, TealError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

SAMPLE_RATE = 16000
JUDGE_KIND = "speech"
CLIPS_PER_CLASS = 4  # clips kept per class for the report's players and spectrograms


def speech_features(wave: "torch.Tensor | np.ndarray", n_mels: int = 80) -> "np.ndarray":
    """A 16 kHz mono clip ``[T]`` as the ``[5 * n_mels]`` float64 input of a speech judge.

    Whisper's log-mel frames (:func:`teal_cli.media.logmel.log_mel`, 10 ms hops, floor 8 decades under
    the clip's loudest bin) pooled over time: the mean and standard deviation over the whole
    clip, then the means over its first, middle and last thirds (the order of the sounds). A
    clip under 3 frames is padded with silence to 3.
    """
    import numpy as np
    import torch

    from ..media import logmel as audio

    w = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(-1)
    if w.numel() < 3 * audio.HOP_LENGTH:
        w = torch.nn.functional.pad(w, (0, 3 * audio.HOP_LENGTH - w.numel()))
    logm = audio.log_mel(w, n_mels).double().numpy().T  # [frames, n_mels]
    thirds = np.array_split(logm, 3)
    return np.concatenate([logm.mean(0), logm.std(0)] + [t.mean(0) for t in thirds])


@dataclass
class SpeechJudge:
    """A linear classifier of spoken words (see the module docstring)."""

    coef: "np.ndarray"
    intercept: "np.ndarray"
    classes: list[str]
    mean: "np.ndarray"
    scale: "np.ndarray"
    n_mels: int = 80
    test_accuracy: float | None = None
    name: str = ""

    def predict(self, features: "np.ndarray") -> list[str]:
        """``[N, F]`` features to N class words."""
        import numpy as np

        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return [self.classes[i] for i in np.argmax(x @ self.coef.T + self.intercept, axis=1)]

    def classify(self, waves: list) -> list[str]:
        """16 kHz clips to class words."""
        import numpy as np

        if not waves:
            return []
        return self.predict(np.stack([speech_features(w, self.n_mels) for w in waves]))


def fit_speech_judge(train: list, train_labels: list[str], test: list | None = None,
                     test_labels: list[str] | None = None, n_mels: int = 80, name: str = "speech-judge") -> SpeechJudge:
    """Fit a :class:`SpeechJudge` on 16 kHz clips and their class words: scikit-learn's
    ``LogisticRegression(max_iter=5000)`` on standardised :func:`speech_features`;
    ``test_accuracy`` on ``test`` when given. Deterministic (lbfgs)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    if len(set(train_labels)) < 2:
        raise DataError(f"a speech judge needs clips of 2 classes or more, got {sorted(set(train_labels))}")
    x = np.stack([speech_features(w, n_mels) for w in train])
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(max_iter=5000).fit((x - mean) / scale, np.asarray(train_labels))
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one score s for classes_[1]; argmax needs [-s/2, s/2]
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    judge = SpeechJudge(coef, intercept, [str(c) for c in model.classes_], mean, scale, n_mels, name=name)
    if test:
        judge.test_accuracy = float(np.mean(np.asarray(judge.classify(test)) == np.asarray(test_labels)))
    return judge


def save_speech_judge(judge: SpeechJudge, path: str | Path) -> None:
    """Write ``judge`` as a pickle-free ``.npz`` (atomically)."""
    import numpy as np

    from .judge import write_npz

    arrays = {"coef": np.asarray(judge.coef, np.float64), "intercept": np.asarray(judge.intercept, np.float64),
              "classes": np.asarray(judge.classes, dtype=np.str_), "mean": np.asarray(judge.mean, np.float64),
              "scale": np.asarray(judge.scale, np.float64), "n_mels": np.asarray(judge.n_mels, np.int64),
              "kind": np.asarray(JUDGE_KIND)}
    if judge.test_accuracy is not None:
        arrays["test_accuracy"] = np.asarray(judge.test_accuracy, np.float64)
    write_npz(path, arrays)


def load_speech_judge(path: str | Path) -> SpeechJudge:
    """Read a speech judge file (never unpickles); errors name the file and the array at fault."""
    import numpy as np

    from .judge import read_npz

    path = Path(path)
    arrays = read_npz(path, ())
    if str(arrays.get("kind", "")) != JUDGE_KIND:
        raise DataError(f"{path}: not a speech judge (no 'kind' array saying \"{JUDGE_KIND}\"; an image judge?)")
    missing = [k for k in ("coef", "intercept", "classes", "mean", "scale", "n_mels") if k not in arrays]
    if missing:
        raise DataError(f"{path}: speech judge file lacks array(s) {', '.join(missing)}")
    coef = arrays["coef"].astype(np.float64)
    n_mels = int(arrays["n_mels"])
    classes = [str(c) for c in arrays["classes"].reshape(-1)]
    intercept = arrays["intercept"].astype(np.float64).reshape(-1)
    mean, scale = arrays["mean"].astype(np.float64).reshape(-1), arrays["scale"].astype(np.float64).reshape(-1)
    f = 5 * n_mels
    if coef.ndim != 2 or coef.shape[1] != f or mean.shape[0] != f or scale.shape[0] != f or (scale == 0).any():
        raise DataError(f"{path}: 'coef' must be [classes, {f}] and 'mean'/'scale' [{f}] (none zero) for n_mels {n_mels}")
    if intercept.shape[0] != coef.shape[0] or len(classes) != coef.shape[0]:
        raise DataError(f"{path}: 'intercept' and 'classes' need {coef.shape[0]} entries (one per row of 'coef')")
    acc = float(arrays["test_accuracy"]) if "test_accuracy" in arrays else None
    return SpeechJudge(coef, intercept, classes, mean, scale, n_mels, acc, name=str(path))


class WhisperJudge:
    """Transcribe 16 kHz clips with a local Whisper checkpoint in the Hugging Face format
    (transformers' ``WhisperForConditionalGeneration`` and ``WhisperProcessor``), greedily,
    in English, without timestamps. Raises UsageError for a folder that is not one."""

    def __init__(self, directory: str | Path, device="cpu", max_new_tokens: int = 32):
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise UsageError(f"--asr-judge {directory}: expected a Hugging Face Whisper folder (config.json, weights, "
                             "tokenizer and preprocessor files)")
        from ..runtime.quiet import quiet_libraries

        quiet_libraries()
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        try:
            self.processor = WhisperProcessor.from_pretrained(str(directory), local_files_only=True)
            self.model = WhisperForConditionalGeneration.from_pretrained(str(directory), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise UsageError(f"--asr-judge {directory}: cannot load a Whisper model and processor: {exc}") from None
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.name = str(directory)

    def transcribe(self, waves: list, batch_size: int = 16) -> list[str]:
        import numpy as np
        import torch

        out: list[str] = []
        for i in range(0, len(waves), batch_size):
            chunk = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves[i:i + batch_size]]
            feats = self.processor.feature_extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            with torch.inference_mode():
                ids = self.model.generate(feats.to(self.device, self.model.dtype), max_new_tokens=self.max_new_tokens,
                                          do_sample=False, num_beams=1)
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


def _reference_text(ref, prompt) -> str:
    from .pairs import text_of

    return str(ref.extra.get("transcript") or text_of(prompt))


def score_speech_gen(pairs, stats, ref_name: str, codecs, *, judge: SpeechJudge | None = None,
                     asr: WhisperJudge | None = None, max_audio_seconds: float | None = None,
                     on_error: str = "fail", warn: Callable[[str], None] | None = None):
    """Judge generated speech (see the module docstring); returns an :class:`EvalResult` whose
    ``figures["clips"]`` (class -> ``[(wave, sample_rate, judged, id)]``) feed the report.

    Raises UsageError without exactly one judge, DataError when nothing is left to score."""
    from .result import EvalResult, nothing_to_score, sort_labels
    from .tasks import _Bad
    from .text import canonical_class

    if (judge is None) == (asr is None):
        raise UsageError("speech-gen needs one judge: --judge FILE.npz (a speech judge) or --asr-judge WHISPER_DIR")
    bad = _Bad(ref_name, on_error, warn, stats)
    by_key = {canonical_class(c): c for c in judge.classes} if judge else {}
    rows = _speech_rows(pairs, codecs, judge, asr, by_key, bad, max_audio_seconds, on_error, warn)
    if not rows:
        nothing_to_score("speech-gen", ref_name, stats.counts(0))
    metrics, per_cat, confusion, clips = _judged(rows, judge, asr, by_key)
    ended = [r[6] for r in rows if r[6] is not None]
    metrics.update(_durations(rows, ended))
    counts = {**stats.counts(len(rows)), "no_audio": sum(r[2] is None for r in rows),
              "closed": sum(1 for e in ended if e), "capped": sum(1 for e in ended if not e)}
    settings = {"judge": judge.name if judge else f"whisper {asr.name} (greedy, transformers)",
                "judge_input": "16 kHz waveform decoded by the segment's codec",
                "max_audio_seconds": max_audio_seconds}
    if asr is not None:
        settings["scoring"] = "jiwer corpus WER/CER of ASR-normalised transcripts against the 'transcript' key, else the prompt text"
    else:
        settings["prompt_class"] = "record 'class'/'label' key, else the judge class word in 'transcript' or the prompt"
    return EvalResult("speech-gen", metrics, counts, settings, per_category=per_cat, confusion=confusion,
                      figures={"clips": {c: clips[c] for c in (sort_labels(list(clips)) if judge else sorted(clips))}})


def _speech_rows(pairs, codecs, judge, asr, by_key, bad, max_audio_seconds, on_error, warn) -> list[tuple]:
    """One row per scorable reference: ``(class key or None, reference text, 16 kHz wave or None,
    sample rate, reference seconds, generated seconds, closed by the model or None, id)``."""
    from .pairs import predicted_segments, split_roles
    from .text import asr_normalize, canonical_class, class_of

    rows = []
    for ref, pred in pairs:
        prompt, targets = split_roles(ref)
        key = None
        if judge is not None:
            label = ref.extra.get("class", ref.extra.get("label"))
            key = canonical_class(str(label)) if label is not None else class_of(
                _reference_text(ref, prompt), list(by_key))
            if key not in by_key:
                what = f"class {label!r} is not one of the judge's" if label is not None else "no judge class word in the reference"
                bad(ref, f"{what} ({', '.join(judge.classes)})")
                continue
        text = _reference_text(ref, prompt)
        if asr is not None and not asr_normalize(text):
            bad(ref, "no reference text (a 'transcript' key or prompt text) to score the transcript against")
            continue
        ref_seg = next((s for s in targets if s.modality == "audio" and s.tokens is not None), None)
        ref_seconds = len(ref_seg.tokens) / float(ref_seg.frame_rate) if ref_seg is not None and ref_seg.frame_rate else None
        seg = next((s for s in predicted_segments(pred) if s.modality == "audio" and s.tokens is not None), None)
        wave, gen_seconds, closed = _decoded(seg, pred, codecs, max_audio_seconds, on_error, warn)
        rows.append((key, text, wave, SAMPLE_RATE, ref_seconds, gen_seconds, closed, pred.id))
    return rows


def _decoded(seg, pred, codecs, max_audio_seconds, on_error, warn):
    """``(16 kHz float wave or None, seconds, closed before the cap or None)`` of a predicted
    audio segment; a segment that does not decode is counted as wrong (or raises with
    ``on_error="fail"``)."""
    from ..media.io import resample
    from ..pipeline.detokenize import decode_segment

    if seg is None:
        return None, None, None
    try:
        codec = codecs.get(seg.codec)
        wave, rate = decode_segment(seg, codec, f"prediction '{pred.id}' audio segment")
    except TealError as exc:
        if on_error == "fail":
            raise
        if warn:
            warn(f"prediction '{pred.id}': {exc} (counted as wrong)")
        return None, None, None
    fr = float(seg.frame_rate or codec.frame_rate)
    closed = len(seg.tokens) < max(1, int(max_audio_seconds * fr)) if max_audio_seconds is not None else None
    wave = wave.float().numpy()
    if rate != SAMPLE_RATE:
        wave = resample(wave, rate, SAMPLE_RATE)
    return wave, len(seg.tokens) / fr, closed


def _judged(rows, judge, asr, by_key):
    """Run the judge over the rows' waves: ``(metrics, per category, confusion, clips)``."""
    import numpy as np

    from . import metrics as M
    from .result import per_category, sort_labels
    from .tasks import NO_CLASS
    from .text import asr_normalize, canonical_class

    waves = [r[2] for r in rows if r[2] is not None]
    heard = iter(judge.classify(waves) if judge else asr.transcribe(waves))
    items, truth, guess, refs, hyps = [], [], [], [], []
    clips: dict[str, list] = {}
    for key, text, wave, rate, _, _, _, rid in rows:
        got = next(heard) if wave is not None else None
        if judge is not None:
            g = canonical_class(got) if got is not None else NO_CLASS
            truth.append(key)
            guess.append(g)
            items.append((by_key[key], g == key))
            cls, shown = by_key[key], by_key.get(g, g)
        else:
            refs.append(asr_normalize(text))
            hyps.append(asr_normalize(got or ""))
            cls, shown = text, got or ""
        if wave is not None and len(clips.setdefault(cls, [])) < CLIPS_PER_CLASS:
            clips[cls].append((wave, rate, shown, rid))
    metrics: dict = {}
    if judge is not None:
        metrics["accuracy"] = M.accuracy([ok for _, ok in items])
        if judge.test_accuracy is not None:
            metrics["judge_test_accuracy"] = judge.test_accuracy
        labels = sort_labels(list(by_key)) + ([NO_CLASS] if NO_CLASS in guess else [])
        confusion = {"labels": [by_key.get(k, k) for k in labels], "matrix": M.confusion(truth, guess, labels)}
        return metrics, per_category(items), confusion, clips
    metrics["wer"], metrics["cer"] = M.wer_cer(refs, hyps)
    per_text: dict[str, list[bool]] = {}
    for r, h in zip(refs, hyps):
        per_text.setdefault(r, []).append(r == h)
    per_cat = {t: {"accuracy": float(np.mean(v)), "count": len(v)} for t, v in sorted(per_text.items())}
    return metrics, per_cat, None, clips


def _durations(rows, ended) -> dict:
    """Closed fraction and mean durations (seconds) of the generated and reference segments."""
    import numpy as np

    out: dict = {}
    gen = [r[5] for r in rows if r[5] is not None]
    ref = [r[4] for r in rows if r[4] is not None]
    if ended:
        out["closed_fraction"] = float(np.mean(ended))
    if gen:
        out["seconds_mean"] = float(np.mean(gen))
    if ref:
        out["reference_seconds_mean"] = float(np.mean(ref))
    both = [(r[5], r[4]) for r in rows if r[4] is not None and r[5] is not None]
    if both:
        out["seconds_ratio_mean"] = float(np.mean([g / max(r, 1e-9) for g, r in both]))
    return out


def speech_report(result, folder: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """Write each kept clip as a WAV under ``folder/audio`` and a spectrogram grid PNG (one row
    per class); return the figures written and the HTML of a table of ``<audio>`` players."""
    import html

    import numpy as np
    import torch

    from ..media import logmel as audio
    from ..media.io import save_audio
    from .report import _pyplot, _save

    clips = result.figures.get("clips") or {}
    if not clips:
        return [], []
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows_html = ["<h2>Generated speech</h2><table><tr><th>class</th><th>clips (judged as)</th></tr>"]
    for cls, items in clips.items():
        cells = []
        for wave, rate, judged, rid in items:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(rid))[:80]
            save_audio(torch.as_tensor(np.asarray(wave, dtype=np.float32)), rate, folder / "audio" / f"{safe}.wav")
            cells.append(f"<figure style=\"display:inline-block;margin:4px\"><audio controls src=\"audio/{html.escape(safe)}.wav\">"
                         f"</audio><figcaption>{html.escape(str(rid))}: {html.escape(str(judged))}</figcaption></figure>")
        rows_html.append(f"<tr><td>{html.escape(str(cls))}</td><td>{''.join(cells)}</td></tr>")
    rows_html.append("</table>")
    plt = _pyplot()
    names = list(clips)
    cols = max(len(v) for v in clips.values())
    fig, axes = plt.subplots(len(names), cols, figsize=(2.2 * cols, 1.4 * len(names)), squeeze=False)
    for i, cls in enumerate(names):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(clips[cls]):
                wave, rate, judged, _ = clips[cls][j]
                w = torch.as_tensor(np.asarray(wave, dtype=np.float32))
                if w.numel() >= audio.HOP_LENGTH:
                    ax.imshow(audio.log_mel(w).numpy(), origin="lower", aspect="auto", cmap="magma")
                ax.set_title(f"{judged} ({len(wave) / rate:.2f} s)", fontsize=7)
            if j == 0:
                ax.set_ylabel(str(cls), fontsize=8)
    fig.tight_layout()
    _save(fig, folder / "spectrograms.png")
    return [(folder / "spectrograms.png", "Log-mel spectrograms of generated speech per class (title: judged as, duration)")], rows_html
