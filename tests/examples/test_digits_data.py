"""examples/digits/make_data.py: counts, disjoint splits, valid manifests, same bytes for a seed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from teal_cli.records import read_records

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")


def _load_make_data():
    spec = importlib.util.spec_from_file_location("digits_make_data", ROOT / "examples" / "digits" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data = _load_make_data()
HAVE_ESPEAK = shutil.which("espeak-ng") is not None


def _records(path: Path):
    with path.open("rb") as f:
        return list(read_records(f, str(path)))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    summary = make_data.make_data(out, seed=0, small=True, audio=False)
    return out, summary


def test_image_counts_splits_and_manifests(images_only):
    from sklearn.datasets import load_digits

    out, summary = images_only
    digits = load_digits()
    counts = summary["counts"]["caption"]
    assert counts == {"train": 139, "val": 21, "test": 40}  # 20 per class, 70/10/20 stratified
    ids = {s: set(summary["images"][s]) for s in SPLITS}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    assert sum(len(v) for v in ids.values()) == 200
    for task in ("caption", "t2i"):
        for split in SPLITS:
            records = _records(out / f"{task}.{split}.jsonl")
            assert len(records) == counts[split]
            per_class = np.bincount([r.extra["label"] for r in records], minlength=10)
            assert per_class.min() >= 1, (task, split, per_class)  # stratified: every class in every split
            for r in records:
                order = [s.modality for s in r.segments]
                assert order == (["image", "text"] if task == "caption" else ["text", "image"])
                seg = r.segments[order.index("image")]
                index = int(Path(seg.path).stem)
                assert seg.path.split("/")[-1][:-4] in ids[split]
                assert r.extra["task"] == {"t2i": "text-to-image"}.get(task, task) and r.extra["label"] == digits.target[index]
                text = r.segments[order.index("text")].text
                assert make_data.WORDS[r.extra["label"]] in text or str(r.extra["label"]) in text
    # Each PNG is the 8x8 digit scaled to 0..255, gray as RGB.
    for name in list(ids["test"])[:5]:
        pixels = np.asarray(Image.open(out / "images" / f"{name}.png"))
        assert pixels.shape == (8, 8, 3) and (pixels[..., 0] == pixels[..., 2]).all()
        expected = np.rint(digits.images[int(name)] * 255 / 16)
        assert np.array_equal(pixels[..., 0], expected)


def test_training_captions_vary_test_captions_fixed(images_only):
    out, _ = images_only
    train = {r.segments[1].text.replace(r.extra["word"], "W").replace(str(r.extra["label"]), "D")
             for r in _records(out / "caption.train.jsonl")}
    test = {r.segments[1].text for r in _records(out / "caption.test.jsonl")}
    assert len(train) >= 4  # several phrasings in training
    assert test == {f"a handwritten {w}" for w in make_data.WORDS}


def test_same_seed_same_bytes_other_seed_other_split(images_only, tmp_path):
    out, summary = images_only
    again = make_data.make_data(tmp_path / "a", seed=0, small=True, audio=False)
    assert again == summary
    assert _digest(tmp_path / "a") == _digest(out)
    other = make_data.make_data(tmp_path / "b", seed=1, small=True, audio=False)
    assert other["images"]["test"] != summary["images"]["test"]


def test_manifest_tokenizes_with_a_patch_codec(images_only, tmp_path):
    """teal's own tokenize pipeline reads the manifests and keeps the extra keys."""
    from typer.testing import CliRunner

    from teal_cli.cli import app

    out, _ = images_only
    runner = CliRunner()
    codec = tmp_path / "patch-p2-k8"
    res = runner.invoke(app, ["cluster", str(out / "caption.train.jsonl"), "--features", "patch", "--patch-size", "2",
                              "--k", "8", "--iters", "3", "-o", str(codec), "-q"])
    assert res.exit_code == 0, res.output
    tok = tmp_path / "t2i.tok.jsonl"
    res = runner.invoke(app, ["tokenize", str(out / "t2i.test.jsonl"), "--codec", str(codec), "-o", str(tok), "-q"])
    assert res.exit_code == 0, res.output
    records = _records(tok)
    assert len(records) == 40
    for r in records:
        assert r.segments[0].modality == "text" and r.segments[1].shape == [4, 4]
        assert r.extra["task"] == "text-to-image" and 0 <= r.extra["label"] <= 9


@pytest.mark.slow  # 120 espeak-ng calls
@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng); CI installs it")
def test_spoken_digits_split_by_speaker_setting(tmp_path):
    import soundfile as sf

    summary = make_data.make_data(tmp_path, seed=0, small=True, jobs=2)
    settings = {s: set(summary["speech"][s]) for s in SPLITS}
    assert sum(len(v) for v in settings.values()) == 12  # 2 voices x 2 speeds x 3 pitches
    assert all(settings[s] for s in SPLITS)
    assert not settings["train"] & settings["test"] and not settings["train"] & settings["val"]
    assert not settings["val"] & settings["test"]
    for split in SPLITS:
        records = _records(tmp_path / f"asr.{split}.jsonl")
        assert len(records) == 10 * len(settings[split]) == summary["counts"]["asr"][split]
        for r in records:
            assert [s.modality for s in r.segments] == ["audio", "text"]
            assert r.segments[1].text == make_data.WORDS[r.extra["label"]]
            assert f"{make_data._voice_slug(r.extra['voice'])}_s{r.extra['speed']}_p{r.extra['pitch']}" in settings[split]
    wave, rate = sf.read(tmp_path / records[0].segments[0].path)
    info = sf.info(tmp_path / records[0].segments[0].path)
    assert rate == 16000 and wave.ndim == 1 and info.subtype == "PCM_16"
    assert 0.2 < len(wave) / rate < 3.0 and np.abs(wave).max() > 0.05  # a spoken word, not silence


def test_trim_silence_cuts_the_silent_ends_and_keeps_a_margin():
    wave = np.zeros(8000)
    wave[2000:5200] = 0.5 * np.sin(np.arange(3200) / 5)
    wave[:2000] += 1e-5  # a noise floor far under -40 dB of the word
    trimmed = make_data.trim_silence(wave)
    # loud 10 ms frames 12..32 (2000 / 160 = 12.5, 5200 / 160 = 32.5), 20 ms (320 samples) kept each side
    assert len(trimmed) == (33 - 12) * 160 + 2 * 320
    np.testing.assert_array_equal(trimmed, wave[12 * 160 - 320: 33 * 160 + 320])
    silent = np.zeros(1600)
    assert make_data.trim_silence(silent) is silent


def test_speech_out_manifests_answer_in_one_training_voice(tmp_path):
    """tts: one spoken request per utterance of the split; i2s: train one per utterance, val/test
    one per image; every answer is the word of the request's (or image's) own digit, spoken in
    the one speaking voice: the training setting nearest SPEAKING_VOICE."""
    out = tmp_path
    make_data.make_images(out, seed=0, small=True)
    settings = {"train": [("en", 130, 35), ("en-us", 190, 50), ("en-us", 160, 65)],
                "val": [("en-us", 160, 50)], "test": [("en", 160, 50)]}  # the preferred voice is not a training one
    for split in SPLITS:
        rows = [{"v": 1, "id": f"asr-{split}-{c}-{k}", "segments": [{"modality": "audio", "path": f"audio/{v}_s{sp}_p{pi}_{c}.wav"},
                {"modality": "text", "text": make_data.WORDS[c]}], "task": "asr", "label": c, "word": make_data.WORDS[c],
                "voice": v, "speed": sp, "pitch": pi}
                for c in range(10) for k, (v, sp, pi) in enumerate(settings[split])]
        (out / f"asr.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    made = make_data.make_speech_out(out, seed=0)
    # en-us first, then the nearest speed (190 and 160 are 30 and 0 away), then pitch
    assert made["speaking_voice"] == {"voice": "en-us", "speed": 160, "pitch": 65}
    counts = made["counts"]
    assert counts["tts"] == {"train": 30, "val": 10, "test": 10}
    assert counts["i2s"] == {"train": 30, "val": 21, "test": 40}
    for split in SPLITS:
        for r in _records(out / f"tts.{split}.jsonl"):
            assert [s.modality for s in r.segments] == ["text", "audio"] and r.extra["task"] == "text-to-speech"
            word = make_data.WORDS[r.extra["label"]]
            assert r.extra["transcript"] == word and (word in r.segments[0].text or str(r.extra["label"]) in r.segments[0].text)
            assert r.segments[1].path == f"audio/en-us_s160_p65_{r.extra['label']}.wav"
        for r in _records(out / f"i2s.{split}.jsonl"):
            assert [s.modality for s in r.segments] == ["image", "audio"] and r.extra["task"] == "image-to-speech"
            assert r.segments[1].path == f"audio/en-us_s160_p65_{r.extra['label']}.wav"
    test_tts = {r.segments[0].text for r in _records(out / "tts.test.jsonl")}
    assert test_tts == {f"say {w}" for w in make_data.WORDS}
