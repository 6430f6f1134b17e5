#!/usr/bin/env python3
"""Make the digits demo's data: scikit-learn's bundled digits and espeak-ng spoken digits.

Usage: python examples/digits/make_data.py OUT [--seed 0] [--small] [--jobs 2]

Writes under OUT (paths in manifests are relative to OUT, where the manifests live):

- ``images/NNNN.png``: the 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (values 0..16,
  scaled to 0..255 as ``round(v * 255 / 16)``), grayscale stored as RGB, named by their index;
- ``audio/<voice>_s<speed>_p<pitch>_<word>.wav``: "zero".."nine" spoken by espeak-ng in every
  combination of voice, speed (words per minute) and pitch (0..99), 16 kHz mono 16-bit; with
  ``--trim-silence`` the leading and trailing silence cut (:func:`trim_silence`), so that speech
  a model writes ends where the word does;
- manifests ``teal tokenize`` reads, one per task and split, as token records whose media
  segments still name a path (``{"v": 1, "id": .., "segments": [{"modality": "image", "path":
  ..}, {"modality": "text", "text": ..}], "task": .., "label": ..}``): segment order is the
  sequence order, and the extra keys (``task``, ``label``, ``word``) survive tokenization
  (a flat manifest entry ``{"id", "image", "text"}`` would lose them):

  - ``caption.{split}.jsonl``: image then text, several phrasings ("a handwritten seven",
    "the digit 7", ...); the test and val splits use the first phrasing for every image;
  - ``t2i.{split}.jsonl``: text request ("draw a seven", ...) then image;
  - ``asr.{split}.jsonl``: audio then the spoken word;
  - ``tts.{split}.jsonl``: a spoken request ("say seven", ...) then the word in the speaking
    voice (one record per utterance of the split; ``"transcript"`` holds the word the speech
    should say);
  - ``i2s.{split}.jsonl``: a digit image then its word in the speaking voice (image -> speech:
    read the digit aloud); train: one per utterance, with a random image of its class; val /
    test: one per image. The speaking voice is one training speaker setting
    (:func:`speaking_voice`, named in ``splits.json``), as a TTS voice is;
- ``splits.json``: seed, counts and the ids in each split; ``labels.json``: the class words.

Splits: images by sample (stratified by class, 70 / 10 / 20 % train / val / test), speech by
(voice, speed, pitch) combination, so no test image and no test speaker setting is seen in
training. Everything is fixed by ``--seed``; a second run with the same arguments rewrites the
same bytes. ``--small`` makes a reduced set for smoke tests (20 images per class, 2 voices x
2 speeds x 3 pitches).

Needs numpy, Pillow, scikit-learn (and its scipy, for the 22,050 -> 16,000 Hz resampling),
soundfile, and the ``espeak-ng`` binary (``apt-get install espeak-ng``) unless ``--no-audio``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Caption phrasings ({w}: the word, {d}: the numeral, {a}: "a" or "an" before the word).
CAPTIONS = (
    "a handwritten {w}",
    "the digit {d}",
    "a picture of the number {w}",
    "the number {w}, written by hand",
    "{a} {w}",
    "an image of the digit {w}",
    "a handwritten digit: {d}",
)
# Text -> image requests.
REQUESTS = (
    "draw {a} {w}",
    "draw the digit {d}",
    "write the number {w} by hand",
    "a handwritten {w}",
    "show me the digit {w}",
    "draw a handwritten {d}",
)

# Text -> speech requests (the "transcript" is the word alone).
SPEAK = (
    "say {w}",
    "say the number {w}",
    "read out the digit {d}",
    "speak the word {w}",
    "pronounce {d}",
    "say {a} {w} aloud",
)
# Silence trimming: 10 ms frames quieter than the loudest frame by more than this are silence
# at either end; TRIM_KEEP_MS of it stays on each side (a soft onset is not cut).
TRIM_DB = 40.0
TRIM_KEEP_MS = 20

# espeak-ng voices: language voice + variant (see `espeak-ng --voices=en`, `--voices=variant`).
VOICES = ("en", "en-us", "en+f3", "en+m3", "en-us+f2", "en-us+m5", "en-gb-scotland+f4", "en-029+m2")
# 8 voices x 3 speeds x 3 pitches = 72 speaker settings, 720 utterances: Whisper tiny.en costs
# ~0.3 CPU-s a clip (a full 30 s window per word), so more settings would spend the demo's
# 20 minutes on feature extraction (measured: 200 settings cost ~1,000 CPU-s, no accuracy gained).
SPEEDS = (130, 160, 190)
PITCHES = (35, 50, 65)
SMALL_VOICES, SMALL_SPEEDS, SMALL_PITCHES = ("en", "en+f3"), (140, 180), (30, 50, 70)
# The voice the model speaks in (text -> speech, image -> speech): the training setting nearest
# this one (speaking_voice). The middle speed and pitch; every setting is still heard in ASR.
SPEAKING_VOICE = ("en-us", 160, 50)

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test
SPLITS = ("train", "val", "test")


def phrase(template: str, label: int) -> str:
    word = WORDS[label]
    return template.format(w=word, d=label, a="an" if word[0] in "aeiou" else "a")


def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def split_indices(labels, seed: int):
    """Stratified train/val/test index arrays (sorted) over ``labels``, fixed by ``seed``."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=FRACTIONS[2], stratify=labels, random_state=seed)
    val_share = FRACTIONS[1] / (FRACTIONS[0] + FRACTIONS[1])
    train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def make_images(out: Path, seed: int, small: bool) -> dict:
    """Write the PNGs and the caption / text-to-image manifests; return the split summary."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    keep = np.arange(len(labels))
    if small:
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), 20, replace=False) for c in range(10)]))
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in keep:
        pixels = np.rint(images[i] * (255.0 / 16.0)).astype(np.uint8)
        path = folder / f"{i:04d}.png"
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(np.stack([pixels] * 3, axis=-1), "RGB").save(tmp, format="PNG")
        os.replace(tmp, path)
    parts = split_indices(labels[keep], seed)
    rng = np.random.default_rng(seed + 1)
    summary = {}
    for split in SPLITS:
        caption, t2i = [], []
        for i in keep[parts[split]]:
            i, label = int(i), int(labels[i])
            image = f"images/{i:04d}.png"
            extra = {"label": label, "word": WORDS[label]}
            cap = CAPTIONS[0] if split != "train" else CAPTIONS[rng.integers(len(CAPTIONS))]
            req = REQUESTS[0] if split != "train" else REQUESTS[rng.integers(len(REQUESTS))]
            caption.append({"v": 1, "id": f"cap-{i:04d}", "segments": [
                {"modality": "image", "path": image}, {"modality": "text", "text": phrase(cap, label)}],
                "task": "caption", **extra})
            t2i.append({"v": 1, "id": f"t2i-{i:04d}", "segments": [
                {"modality": "text", "text": phrase(req, label)}, {"modality": "image", "path": image}],
                "task": "text-to-image", **extra})
        _write_atomic(out / f"caption.{split}.jsonl", _jsonl(caption))
        _write_atomic(out / f"t2i.{split}.jsonl", _jsonl(t2i))
        summary[split] = [f"{int(i):04d}" for i in keep[parts[split]]]
    return summary


def _voice_slug(voice: str) -> str:
    return voice.replace("+", "_")


def trim_silence(wave, rate: int = SAMPLE_RATE, db: float = TRIM_DB, keep_ms: int = TRIM_KEEP_MS):
    """``wave`` (1-D float array) without its leading and trailing silence: the 10 ms frames
    before the first and after the last frame within ``db`` dB of the loudest frame's RMS,
    ``keep_ms`` ms kept on each side. espeak-ng pads every word with ~0.1-0.3 s of silence; a
    model trained on padded clips ends each segment with a run of one silence id that greedy
    decoding repeats to the length cap instead of closing it. All-silent input is returned as is."""
    import numpy as np

    hop = rate // 100
    n = len(wave) // hop
    if n == 0:
        return wave
    rms = np.sqrt(np.mean(np.square(wave[: n * hop].reshape(n, hop)), axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (-db / 20)) if rms.max() > 0 else np.array([], dtype=int)
    if loud.size == 0:
        return wave
    keep = keep_ms * rate // 1000
    return wave[max(0, loud[0] * hop - keep): min(len(wave), (loud[-1] + 1) * hop + keep)]


def _speak(espeak: str, voice: str, speed: int, pitch: int, word: str, path: Path, trim: bool = False) -> None:
    """One espeak-ng utterance, resampled to 16 kHz mono 16-bit WAV at ``path`` (atomically)."""
    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        proc = subprocess.run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), word],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not raw.exists():
            raise RuntimeError(f"espeak-ng -v {voice} -s {speed} -p {pitch} {word!r} failed: {proc.stderr.strip()}")
        wave, rate = sf.read(raw, dtype="float64", always_2d=True)
    if rate != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
    wave = resample_poly(wave.mean(axis=1), 160, 441)  # 22050 * 160 / 441 = 16000
    if trim:
        wave = trim_silence(wave)
    pcm = np.clip(np.rint(wave * 32767.0), -32768, 32767).astype(np.int16)
    part = path.with_name(path.name + ".tmp.wav")
    sf.write(part, pcm, SAMPLE_RATE, subtype="PCM_16")
    os.replace(part, path)


def make_audio(out: Path, seed: int, small: bool, jobs: int, trim: bool = False) -> dict:
    """Speak every digit in every (voice, speed, pitch) combination; write the ASR manifests."""
    import numpy as np

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("Error: espeak-ng not found; install it (apt-get install espeak-ng) or pass --no-audio")
    voices, speeds, pitches = (SMALL_VOICES, SMALL_SPEEDS, SMALL_PITCHES) if small else (VOICES, SPEEDS, PITCHES)
    combos = list(itertools.product(voices, speeds, pitches))
    order = np.random.default_rng(seed + 2).permutation(len(combos))
    n_test = max(1, round(FRACTIONS[2] * len(combos)))
    n_val = max(1, round(FRACTIONS[1] * len(combos)))
    chosen = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    folder = out / "audio"
    folder.mkdir(parents=True, exist_ok=True)
    jobs_list, manifests, summary = [], {}, {}
    for split in SPLITS:
        records, names = [], []
        for c in sorted(chosen[split]):
            voice, speed, pitch = combos[c]
            setting = f"{_voice_slug(voice)}_s{speed}_p{pitch}"
            names.append(setting)
            for label, word in enumerate(WORDS):
                name = f"{setting}_{word}"
                jobs_list.append((voice, speed, pitch, word, folder / f"{name}.wav"))
                records.append({"v": 1, "id": f"asr-{name}", "segments": [
                    {"modality": "audio", "path": f"audio/{name}.wav"}, {"modality": "text", "text": word}],
                    "task": "asr", "label": label, "word": word,
                    "voice": voice, "speed": speed, "pitch": pitch})
        manifests[split] = records
        summary[split] = names
    with ThreadPoolExecutor(max(1, jobs)) as pool:  # each job waits on its own espeak-ng process
        for _ in pool.map(lambda job: _speak(espeak, *job, trim=trim), jobs_list):
            pass
    for split in SPLITS:
        _write_atomic(out / f"asr.{split}.jsonl", _jsonl(manifests[split]))
    return summary


def speaking_voice(train: list[dict]) -> dict:
    """The one speaker setting the model learns to speak in: of the training split's settings,
    the one nearest SPEAKING_VOICE (speed, then pitch, then the order of VOICES).

    Speech out is single-speaker, as TTS without speaker conditioning is: with every training
    setting as a target (51 settings, 39-49 distinct id sequences a word), greedy decoding
    averaged the voices and two of the ten words came out wrong (examples/digits/README.md)."""
    voice, speed, pitch = SPEAKING_VOICE
    order = {v: i for i, v in enumerate(VOICES + SMALL_VOICES)}
    settings = {(r["voice"], r["speed"], r["pitch"]) for r in train}
    best = min(settings, key=lambda t: (t[0] != voice, abs(t[1] - speed), abs(t[2] - pitch), order.get(t[0], 99)))
    return {"voice": best[0], "speed": best[1], "pitch": best[2]}


def make_speech_out(out: Path, seed: int) -> dict:
    """The speech-out manifests (``tts``, ``i2s``) from the ASR and caption manifests already
    in ``out``, every target utterance in the :func:`speaking_voice`; returns their counts per
    split and the voice."""
    import numpy as np

    rng = np.random.default_rng(seed + 3)
    asr_train = [json.loads(x) for x in (out / "asr.train.jsonl").read_text().splitlines()]
    voice = speaking_voice(asr_train)
    clip = {r["label"]: r["segments"][0]["path"] for r in asr_train
            if (r["voice"], r["speed"], r["pitch"]) == (voice["voice"], voice["speed"], voice["pitch"])}
    counts: dict[str, dict[str, int]] = {"tts": {}, "i2s": {}}
    for split in SPLITS:
        asr = [json.loads(x) for x in (out / f"asr.{split}.jsonl").read_text().splitlines()]
        images = [json.loads(x) for x in (out / f"caption.{split}.jsonl").read_text().splitlines()]
        by_label_image = {c: [r for r in images if r["label"] == c] for c in range(len(WORDS))}
        tts, i2s = [], []
        # As many requests as the split has utterances (train: a random phrasing each; val and
        # test: the first phrasing); each is answered in the speaking voice.
        for r in asr:
            label = r["label"]
            req = SPEAK[0] if split != "train" else SPEAK[rng.integers(len(SPEAK))]
            tts.append({"v": 1, "id": "tts-" + r["id"].removeprefix("asr-"), "segments": [
                {"modality": "text", "text": phrase(req, label)}, {"modality": "audio", "path": clip[label]}],
                "task": "text-to-speech", "label": label, "word": WORDS[label], "transcript": WORDS[label]})
            if split == "train" and by_label_image[label]:
                image = by_label_image[label][rng.integers(len(by_label_image[label]))]
                i2s.append({"v": 1, "id": "i2s-" + r["id"].removeprefix("asr-"), "segments": [
                    image["segments"][0], {"modality": "audio", "path": clip[label]}],
                    "task": "image-to-speech", "label": label, "word": WORDS[label], "transcript": WORDS[label]})
        if split != "train":
            for image in images:  # every held-out image read aloud
                label = image["label"]
                i2s.append({"v": 1, "id": "i2s-" + image["id"].removeprefix("cap-"), "segments": [
                    image["segments"][0], {"modality": "audio", "path": clip[label]}],
                    "task": "image-to-speech", "label": label, "word": WORDS[label], "transcript": WORDS[label]})
        _write_atomic(out / f"tts.{split}.jsonl", _jsonl(tts))
        _write_atomic(out / f"i2s.{split}.jsonl", _jsonl(i2s))
        counts["tts"][split], counts["i2s"][split] = len(tts), len(i2s)
    return {"counts": counts, "speaking_voice": voice}


def make_data(out: str | Path, seed: int = 0, small: bool = False, jobs: int = 2, audio: bool = True,
              trim: bool = False) -> dict:
    """Make every file under ``out``; return the contents of ``splits.json``.

    ``splits.json``: ``{"seed", "small", "counts": {task: {split: n}}, "images": {split: [ids]},
    "speech": {split: ["<voice>_s<speed>_p<pitch>", ...]}}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = make_images(out, seed, small)
    speech = make_audio(out, seed, small, jobs, trim) if audio else {}
    counts = {"caption": {s: len(images[s]) for s in SPLITS}, "t2i": {s: len(images[s]) for s in SPLITS}}
    if audio:
        counts["asr"] = {s: len(speech[s]) * len(WORDS) for s in SPLITS}
        speech_out = make_speech_out(out, seed)
        counts.update(speech_out["counts"])
    summary = {"seed": seed, "small": small, "trim_silence": trim, "counts": counts, "images": images, "speech": speech}
    if audio:
        summary["speaking_voice"] = speech_out["speaking_voice"]
    _write_atomic(out / "labels.json", json.dumps(list(WORDS)) + "\n")
    _write_atomic(out / "splits.json", json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="split and phrasing seed (default 0)")
    parser.add_argument("--small", action="store_true", help="reduced set for smoke tests")
    parser.add_argument("--jobs", type=int, default=2, help="espeak-ng processes at once (default 2)")
    parser.add_argument("--no-audio", action="store_true", help="images only (no espeak-ng needed)")
    parser.add_argument("--trim-silence", action="store_true",
                        help="cut each utterance's leading and trailing silence (for speech out: DIGITS_SPEAK=1)")
    args = parser.parse_args(argv)
    summary = make_data(args.out, seed=args.seed, small=args.small, jobs=args.jobs, audio=not args.no_audio,
                        trim=args.trim_silence)
    for task, per_split in summary["counts"].items():
        print(f"{task:8s} " + "  ".join(f"{s} {n:5d}" for s, n in per_split.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
