"""Inputs whose size or content would otherwise exhaust memory or give nothing (issue 16):
thin images, audio headers claiming years, clips shorter than a feature extractor's first
frame, float images with NaN pixels, and -q silencing the libraries models load through."""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from teal_cli.media import pixels as pixels_module
from teal_cli.errors import DataError
from teal_cli.media.io import load_audio, load_image
from teal_cli.media.pixels import PixelPrep

BEIT2 = PixelPrep("shorter", 256, Image.BICUBIC, crop=224)  # Beit2Codec.pixel_prep()
DALLE = PixelPrep("shorter_rounded", 256, Image.LANCZOS, crop=256)  # DalleCodec / VQGANCodec


def _one_line_error(result, *needles: str, code: int = 1) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- thin images


def test_codecs_geometry_is_the_one_checked_here():
    from teal_cli.codecs.beit2 import Beit2Codec
    from teal_cli.codecs.dalle import DalleCodec
    from teal_cli.codecs.vqgan import VQGANCodec

    for cls, prep in ((Beit2Codec, BEIT2), (DalleCodec, DALLE), (VQGANCodec, DALLE)):
        codec = object.__new__(cls)
        codec.image_size, codec.name = prep.crop, cls.__name__
        assert codec.pixel_prep() == prep, cls.__name__


SIZES = [(1, 900), (2, 1500), (3, 701), (7, 3001), (900, 1), (1501, 5), (13, 999), (333, 2), (17, 257), (5, 1023),
         (2, 30), (7, 300), (300, 7), (224, 3000), (3000, 256), (600, 400), (250, 251)]
PREPS = [BEIT2, DALLE, PixelPrep("shorter", 64, Image.BILINEAR, crop=56), PixelPrep("shorter_rounded", 32, Image.BOX, crop=32),
         PixelPrep("shorter", 40, Image.HAMMING, crop=40)]


@pytest.mark.parametrize("prep", PREPS, ids=lambda p: f"{p.resize}-{p.resample}-{p.crop}")
def test_window_only_resize_gives_the_whole_resizes_bytes(prep, monkeypatch):
    """Above MAX_RESIZED_PIXELS only the crop's window is resized, in Pillow's pass order
    with its weights: byte for byte the whole resize then crop, thin, wide or ordinary."""
    rng = np.random.default_rng(prep.size)
    for w, h in SIZES:
        if np.prod(prep.resized_size(w, h)) > 1 << 22:  # the whole resize, the reference, stays cheap
            continue
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        monkeypatch.setattr(pixels_module, "MAX_RESIZED_PIXELS", 1 << 40)
        whole = prep.apply(image)[0]
        monkeypatch.setattr(pixels_module, "MAX_RESIZED_PIXELS", 0)
        window = prep.apply(image)[0]
        assert np.array_equal(window, whole), (w, h)


def test_thin_image_takes_flat_memory():
    """1 x 200,000 px: 'shorter side to 256' would be 256 x 51,200,000 (39 GB of RGB)."""
    code = (
        "import resource, numpy as np\n"
        "from PIL import Image\n"
        "from teal_cli.media.pixels import PixelPrep\n"
        "start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for w, h in ((1, 200000), (200000, 1), (3, 150000)):\n"
        "    im = Image.fromarray(np.full((h, w, 3), 90, np.uint8))\n"
        "    for prep in (PixelPrep('shorter', 256, 3, crop=224), PixelPrep('shorter_rounded', 256, 1, crop=256)):\n"
        "        out, _ = prep.apply(im)\n"
        "        assert out.shape == (prep.crop, prep.crop, 3) and (out == 90).all(), out.shape\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 100, f"{done.stdout} MB more"


def test_huge_target_without_a_crop_is_refused_with_the_limit():
    prep = PixelPrep("shorter", 256)
    with pytest.raises(DataError, match=r"thin.png: resizing 1x200000 to 256x51200000 .* limit of 16777216 pixels"):
        prep.apply(Image.new("RGB", (1, 200000)), "thin.png")


class _GeometryOnly:
    """An image codec with BEiT-v2's geometry whose ids are the pixel sums (no weights)."""

    @staticmethod
    def make(prep):
        from teal_cli.codecs.base import ImageCodec

        class Codec(ImageCodec):
            name, vocab_size, image_size = "geometry", 1 << 30, prep.crop

            def pixel_prep(self, image_size=None):
                return prep

            def pixel_table(self):
                return np.arange(256, dtype=np.float32)

            def encode(self, pixels):
                return pixels.sum(dim=(1, 2, 3), keepdim=True).long()[:, :, 0]

        return Codec()


def test_thin_images_tokenize_like_the_whole_resize(tmp_path, monkeypatch):
    from teal_cli.records import Record, Segment
    from teal_cli.pipeline.tokenize import TokenizeOptions, tokenize_records

    rng = np.random.default_rng(1)
    paths = []
    for w, h in ((1, 2000), (3, 900), (640, 480)):
        paths.append(tmp_path / f"{w}x{h}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    codec = _GeometryOnly.make(PixelPrep("shorter", 64, Image.BICUBIC, crop=56))
    monkeypatch.setattr(pixels_module, "MAX_RESIZED_PIXELS", 1 << 20)  # the thin two go the window way

    def run():
        records = [Record(id=p.stem, segments=[Segment(modality="image", path=str(p))]) for p in paths]
        options = TokenizeOptions(loader="threads", workers=1)
        return [r.segments[0].tokens for r in tokenize_records(records, [codec], options)]

    window = run()
    monkeypatch.setattr(pixels_module, "MAX_RESIZED_PIXELS", 1 << 40)
    assert window == run()


# --------------------------------------------------------------------------- float images


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_float_image_with_nan_or_inf_is_refused(tmp_path, value):
    data = np.full((4, 5), 100.0, np.float32)
    data[2, 3] = value
    Image.fromarray(data, mode="F").save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"f.tiff: float image has 1 NaN or infinite pixel value\(s\) of 20"):
        load_image(tmp_path / "f.tiff")
    data[2, 3] = 7.0
    Image.fromarray(data, mode="F").save(tmp_path / "ok.tiff")
    assert load_image(tmp_path / "ok.tiff").getpixel((3, 2)) == (7, 7, 7)


def test_float_image_with_nan_fails_the_cli_in_one_line(tmp_path, patch_codec, cli):
    data = np.full((16, 16), 0.5, np.float32)
    data[0, 0] = np.nan
    Image.fromarray(data, mode="F").save(tmp_path / "nan.tif")
    r = cli("tokenize", tmp_path / "nan.tif", "--codec", patch_codec, "-o", tmp_path / "out.jsonl")
    _one_line_error(r, "nan.tif", "NaN")
    assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------- audio length


def _flac_claiming(tmp_path, samples: int):
    """A real 0.1 s FLAC whose STREAMINFO claims ``samples`` (36 bits)."""
    path = tmp_path / "claims.flac"
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(1600)).astype(np.float32), 16000)
    data = bytearray(path.read_bytes())
    at = 8 + 13  # after 'fLaC' and the block header: the total-samples field's top 4 bits
    data[at] = (data[at] & 0xF0) | (samples >> 32)
    data[at + 1 : at + 5] = struct.pack(">I", samples & 0xFFFFFFFF)
    path.write_bytes(data)
    assert sf.info(str(path)).frames == samples
    return path


def test_audio_header_claiming_years_is_refused_before_reading(tmp_path, monkeypatch):
    path = _flac_claiming(tmp_path, (1 << 36) - 1)  # 49 days at 16 kHz: 256 GiB as float32
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"claims.flac: audio too long .*limit 3600 s.*TEAL_MAX_AUDIO_SECONDS"):
        load_audio(path, 16000)
    monkeypatch.setenv("TEAL_MAX_AUDIO_SECONDS", "1e12")  # the user lifts the limit: still one line
    with pytest.raises(DataError, match="claims.flac: not enough memory"):
        load_audio(path, 16000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_audio_limit_is_the_duration(tmp_path, monkeypatch):
    sf.write(tmp_path / "two.wav", np.zeros(32000, np.float32), 16000)
    monkeypatch.setenv("TEAL_MAX_AUDIO_SECONDS", "1.5")
    with pytest.raises(DataError, match=r"two.wav: audio too long \(32000 samples at 16000 Hz = 2 s, limit 1.5 s\)"):
        load_audio(tmp_path / "two.wav", 16000)
    monkeypatch.setenv("TEAL_MAX_AUDIO_SECONDS", "2")
    assert load_audio(tmp_path / "two.wav", 16000).shape == (32000,)


def test_long_audio_header_fails_the_cli_in_one_line(tmp_path, wav_file, cli):
    r = cli("cluster", wav_file, "--features", "mel", "--k", "4", "--iters", "2", "-q")
    assert r.exit_code == 0, r.stderr
    r = cli("tokenize", _flac_claiming(tmp_path, 1 << 35), "--codec", r.stdout.strip(), "-o", tmp_path / "o.jsonl")
    _one_line_error(r, "claims.flac", "audio too long")
    assert not (tmp_path / "o.jsonl").exists()


# --------------------------------------------------------------------------- short clips


def test_each_extractors_min_samples_is_its_first_frame(tiny_whisper_pt):
    from teal_cli.media import logmel as audio
    from teal_cli.features.hubert import receptive_field
    from teal_cli.features.mel import MelFeatures
    from teal_cli.features.whisper import WhisperFeatures

    assert receptive_field((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)) == 400  # HuBERT / wav2vec 2.0
    mel = MelFeatures()
    assert mel.min_samples == 160
    assert mel.extract([torch.zeros(160)])[0].shape[0] == 1 and audio.log_mel(torch.zeros(159)).shape[-1] == 0
    whisper = WhisperFeatures.from_name("whisper", layer=1, checkpoint=str(tiny_whisper_pt))
    assert whisper.min_samples == 320 and whisper.extract([torch.zeros(320)])[0].shape[0] == 1


@pytest.fixture(scope="module")
def hubert_codec(tmp_path_factory, speechlike_wave):
    """A k-means codec on a tiny random HuBERT (a real Hugging Face folder), fitted by the CLI."""
    transformers = pytest.importorskip("transformers")
    from typer.testing import CliRunner

    from teal_cli.cli import app

    config = transformers.HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, conv_dim=(8,) * 7, num_conv_pos_embeddings=16,
                                       num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hubert")
    transformers.HubertModel(config).save_pretrained(root / "hubert-tiny")
    sf.write(root / "speech.wav", speechlike_wave.numpy(), 16000)
    runner = CliRunner()
    args = ["cluster", str(root / "speech.wav"), "--features", "hubert", "--checkpoint", str(root / "hubert-tiny"),
            "--layer", "1", "--k", "4", "--iters", "2", "-o", str(root / "codec")]
    fitted = runner.invoke(app, args, catch_exceptions=False)
    assert fitted.exit_code == 0, fitted.stderr
    return root, fitted


def test_hubert_clip_shorter_than_its_receptive_field_is_an_error(hubert_codec, cli, tmp_path):
    """350 samples is more than HuBERT's 320-sample hop but less than the 400 its first
    frame sees: an error (or a skip), never "tokens": []."""
    root, _ = hubert_codec
    rng = np.random.default_rng(0)
    for n in (319, 350, 399, 400):
        sf.write(tmp_path / f"c{n}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
    for n in (319, 350, 399):
        r = cli("tokenize", tmp_path / f"c{n}.wav", "--codec", root / "codec", "-o", tmp_path / "o.jsonl")
        _one_line_error(r, f"c{n}.wav", f"{n} samples", "(400 samples)")
        assert not (tmp_path / "o.jsonl").exists()
    r = cli("tokenize", tmp_path / "c400.wav", "--codec", root / "codec", "-q")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["segments"][0]["tokens"]) == 1
    manifest = "\n".join(json.dumps({"id": f"c{n}", "audio": str(tmp_path / f"c{n}.wav")}) for n in (350, 400))
    (tmp_path / "m.jsonl").write_text(manifest + "\n")
    r = cli("tokenize", tmp_path / "m.jsonl", "--codec", root / "codec", "--on-error", "skip", "-q")
    assert r.exit_code == 1 and "c350.wav" in r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == ["c400"]


def test_quiet_silences_transformers_loading_bar(hubert_codec, cli, tmp_path, monkeypatch):
    """Without -q transformers draws its "Loading weights" bar on stderr; with -q nothing."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    from teal_cli.runtime.quiet import ENVIRONMENT

    root, _ = hubert_codec
    for key in ENVIRONMENT:  # quiet_libraries sets them (an earlier -q run may have): restored after the test
        monkeypatch.delenv(key, raising=False)
    verbosity, bars, hub_off = logging.get_verbosity(), logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    sf.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    try:
        logging.set_verbosity_warning()
        logging.enable_progress_bar()
        with warnings.catch_warnings():  # huggingface_hub warns where its import saw the variable set
            warnings.simplefilter("ignore")
            enable_progress_bars()
        loud = cli("tokenize", tmp_path / "a.wav", "--codec", root / "codec")
        assert loud.exit_code == 0 and "Loading weights" in loud.stderr, loud.stderr  # the bar in question
        r = cli("tokenize", tmp_path / "a.wav", "--codec", root / "codec", "-q")
        assert r.exit_code == 0 and r.stderr == "", r.stderr
        assert not logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar() if bars else logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            disable_progress_bars() if hub_off else enable_progress_bars()


def test_codec_giving_no_tokens_is_an_error_not_an_empty_segment(wav_file, cli, tmp_path, monkeypatch):
    """The safety net behind min_samples: a clip encoded to no ids fails (or is skipped)."""
    from teal_cli.features.mel import MelFeatures

    r = cli("cluster", wav_file, "--features", "mel", "--k", "4", "--iters", "2", "-q")
    assert r.exit_code == 0, r.stderr
    codec = r.stdout.strip()
    monkeypatch.setattr(MelFeatures, "min_samples", property(lambda self: 1))  # a wrong minimum
    sf.write(tmp_path / "tiny.wav", np.full(100, 0.1, np.float32), 16000)
    r = cli("tokenize", tmp_path / "tiny.wav", "--codec", codec, "-o", tmp_path / "o.jsonl")
    _one_line_error(r, "tiny.wav", "gave no tokens for 100 samples")
    assert not (tmp_path / "o.jsonl").exists()
    manifest = [{"id": "tiny", "audio": str(tmp_path / "tiny.wav")}, {"id": "ok", "audio": str(wav_file)}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    r = cli("tokenize", tmp_path / "m.jsonl", "--codec", codec, "--on-error", "skip", "-q")
    assert r.exit_code == 1 and "tiny.wav" in r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == ["ok"]
