"""Media loading: every Pillow mode to RGB, EXIF orientation, audio to mono at the codec rate."""

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from teal_cli.errors import DataError
from teal_cli.media.io import load_audio, load_image


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "I", "F", "CMYK", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (7, 5), (200, 100, 50))
    im = rgb.convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (7, 5), 40000 if mode == "I;16" else 128)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    im.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (7, 5)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 65535 of full scale


def test_transparent_pixels_composite_on_white(tmp_path):
    im = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (10, 20, 30, 255))
    im.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 30)


@pytest.mark.parametrize("orientation", [None, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_exif_orientation_as_pillow_applies_it(tmp_path, orientation, suffix):
    """Every orientation tag, valid or not (and none), gives ImageOps.exif_transpose's pixels."""
    from PIL import ImageOps

    rng = np.random.default_rng(orientation or 0)
    im = Image.fromarray(rng.integers(0, 256, (10, 16, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    path = tmp_path / f"o{suffix}"
    im.save(path, exif=exif, **({"lossless": True} if suffix == ".webp" else {}))
    with Image.open(path) as ref:
        expected = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"))
    out = load_image(path)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected)
    if orientation in (5, 6, 7, 8):
        assert out.size == (10, 16)


@pytest.mark.parametrize("name", ["a.gif", "a.tiff", "a.mpo", "a.jpg", "a.png", "bad.jpg"])
def test_images_load_first_frame_and_leave_no_file_open(tmp_path, name):
    """The first frame comes back usable and no file stays open: not a multi-frame file,
    which Pillow keeps open to seek, nor a broken one."""
    import gc
    import warnings

    frames = [Image.new("RGB", (8, 6), c) for c in ((250, 0, 0), (0, 250, 0))]
    if name == "bad.jpg":
        frames[0].save(tmp_path / "good.jpg")
        (tmp_path / name).write_bytes((tmp_path / "good.jpg").read_bytes()[:200])
    elif name in ("a.jpg", "a.png"):
        frames[0].save(tmp_path / name)
    else:
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], format="MPO" if name.endswith("mpo") else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        if name == "bad.jpg":
            with pytest.raises(DataError, match="bad.jpg: cannot read image"):
                load_image(tmp_path / name)
        else:
            out = load_image(tmp_path / name)
            assert out.size == (8, 6) and abs(out.getpixel((4, 3))[0] - 250) <= 3
            out.getpixel((0, 0))  # usable after the file was closed
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_16_bit_wav_gives_libsndfiles_floats(tmp_path):
    """16-bit WAV is read as int16 and scaled by teal: every one of the 65,536 values must
    come out as the float libsndfile itself gives, mono and averaged to mono."""
    values = np.arange(-32768, 32768, dtype=np.int16)
    sf.write(tmp_path / "mono.wav", values, 16000, subtype="PCM_16")
    sf.write(tmp_path / "stereo.wav", np.stack([values, values[::-1]], 1), 16000, subtype="PCM_16")
    mono = sf.read(tmp_path / "mono.wav", dtype="float32")[0]
    assert np.array_equal(load_audio(tmp_path / "mono.wav", 16000).numpy(), mono)
    stereo = sf.read(tmp_path / "stereo.wav", dtype="float32", always_2d=True)[0].mean(axis=1)
    assert np.array_equal(load_audio(tmp_path / "stereo.wav", 16000).numpy(), stereo)
    assert mono.min() == -1.0 and mono.dtype == np.float32


def test_audio_downmix_resample_and_errors(tmp_path):
    t = np.arange(44100) / 44100
    left = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    sf.write(tmp_path / "s.flac", np.stack([left, -left], 1), 44100)
    wave = load_audio(tmp_path / "s.flac", 16000)
    assert abs(len(wave) - 16000) <= 1 and float(wave.abs().max()) < 1e-3  # opposite channels cancel
    sf.write(tmp_path / "m.wav", left, 44100)
    wave = load_audio(tmp_path / "m.wav", 16000)
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    assert abs(int(spectrum.argmax()) - 440) <= 1  # 1 s at 16 kHz -> 1 Hz bins
    nan = left.copy()
    nan[5] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    with pytest.raises(DataError, match="nan.wav: audio contains NaN"):
        load_audio(tmp_path / "nan.wav", 16000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(DataError, match="junk.wav: cannot read audio"):
        load_audio(tmp_path / "junk.wav", 16000)


def test_mp3_reads(tmp_path):
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "a.mp3", (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 8000, format="MP3")
    wave = load_audio(tmp_path / "a.mp3", 16000)
    assert abs(len(wave) - 16000) < 2000 and float(wave.abs().max()) > 0.3


