"""Reading and writing media: images through Pillow, audio through soundfile + soxr.

Every loader turns a file into the one form codecs take (RGB PIL image; mono float32
waveform at the codec's rate) and every failure into a :class:`DataError` naming the file.
Writers are atomic (:mod:`teal_cli.runtime.files`).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from ..runtime.files import atomic_output

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".au"})

# Pillow's own default guard (~89 Mpx) only warns; teal refuses instead. Override with
# TEAL_MAX_IMAGE_PIXELS for legitimately huge scans.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Longest audio read (seconds, from the file's header, before any sample is decoded): an hour
# is 230 MB at 16 kHz (1.4 GB as 48 kHz stereo while reading), and a header can claim years.
# Override with TEAL_MAX_AUDIO_SECONDS for longer recordings.
DEFAULT_MAX_AUDIO_SECONDS = 3600.0


def modality_of(path: str | Path) -> str | None:
    """``image``/``audio`` by file extension, or None."""
    ext = os.path.splitext(os.fspath(path))[1].lower()  # Path's suffix, without building a Path
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    return None


# --------------------------------------------------------------------------- images


def load_image(path: str | Path) -> "Image.Image":
    """Open any Pillow-readable image as RGB, upright (EXIF orientation applied).

    Palette, grey, 16-bit and alpha images are converted (alpha composited on white, so a
    transparent logo does not turn black). Decompression bombs are refused.
    """
    from PIL import ExifTags, Image, ImageOps

    limit = int(os.environ.get("TEAL_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))
    # Pillow errors only above twice its limit and warns below that; teal checks the size
    # itself (below) and silences the warning once (not through catch_warnings, which is not
    # thread-safe, and loaders run in threads). Pillow's process-wide limit is only ever
    # raised to teal's, never lowered: other code in the process keeps its own guard.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit
    _silence_bomb_warning()
    try:
        with Image.open(path) as im:
            if im.width * im.height > limit:
                raise DataError(f"{path}: image too large ({im.width}x{im.height} = {im.width * im.height} pixels, "
                                f"limit {limit}); refused as a possible decompression bomb "
                                "(raise TEAL_MAX_IMAGE_PIXELS if it is genuine)")
            im.load()
            # exif_transpose copies every image it does not turn (0.2 ms of a 1.2 ms decode
            # for a 500 x 375 JPEG): only images with an orientation to apply go through it.
            if im.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSED:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im, path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large ({exc}); refused as a possible decompression bomb "
                        "(raise TEAL_MAX_IMAGE_PIXELS if it is genuine)") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports unknown formats and truncated data as OSError/SyntaxError.
        raise DataError(f"{path}: cannot read image ({exc})") from None


_bomb_warning_silenced = False
_TRANSPOSED = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations other than upright (1); compared, not hashed


def _silence_bomb_warning() -> None:
    global _bomb_warning_silenced
    if not _bomb_warning_silenced:
        from PIL import Image

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _bomb_warning_silenced = True


def to_rgb(im: "Image.Image", where: "str | Path" = "image") -> "Image.Image":
    """Any Pillow mode to 8-bit RGB. A float image (mode ``F``) with NaN or infinite pixels
    is a :class:`DataError` naming ``where``: no 8-bit value stands for them."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise DataError(f"{where}: float image has {bad} NaN or infinite pixel value(s) of {arr.size}; "
                            "replace them (or save the image as 8/16-bit) and retry")
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def tensor_to_image(pixels: "torch.Tensor") -> "Image.Image":
    """``[3, H, W]`` float in ``[0, 1]`` to an RGB PIL image (rounded, clipped)."""
    from PIL import Image

    arr = pixels.detach().float().clamp(0, 1).mul(255.0).round().to("cpu").byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


def save_image(im: "Image.Image", path: str | Path) -> None:
    """Save atomically; the format follows the extension (PNG when it has none known)."""
    path = Path(path)
    fmt = None if path.suffix.lower() in IMAGE_EXTENSIONS else "PNG"
    with atomic_output(path, binary=True) as f:
        im.save(f, format=fmt or _pil_format(path))


def _pil_format(path: Path) -> str:
    from PIL import Image

    Image.init()
    return Image.EXTENSION.get(path.suffix.lower(), "PNG")


# --------------------------------------------------------------------------- audio


def load_audio(path: str | Path, sample_rate: int) -> "torch.Tensor":
    """Read any soundfile-readable file as a mono float32 waveform at ``sample_rate``.

    Channels are averaged; resampling uses soxr (high quality). Empty, silent-by-NaN or
    unreadable files, and files longer than ``TEAL_MAX_AUDIO_SECONDS`` (default an hour, read
    from the header before decoding) are a :class:`DataError`.
    """
    import numpy as np
    import soundfile as sf
    import torch

    limit = float(os.environ.get("TEAL_MAX_AUDIO_SECONDS", DEFAULT_MAX_AUDIO_SECONDS))
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            if f.frames > limit * rate:
                raise DataError(f"{path}: audio too long ({f.frames} samples at {rate} Hz = {f.frames / rate:.0f} s, "
                                f"limit {limit:g} s); split it, or raise TEAL_MAX_AUDIO_SECONDS if it is genuine")
            if f.format == "WAV" and f.subtype == "PCM_16":
                # libsndfile's own conversion is sample * 2^-15 in float32, exact; done here
                # on int16 samples it is 2.7x faster (10 s: 0.23 -> 0.09 ms), the same floats.
                data = f.read(dtype="int16", always_2d=True).astype(np.float32)
                data *= np.float32(1.0 / 32768)
            else:
                data = f.read(dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except MemoryError:
        raise DataError(f"{path}: not enough memory to read its {f.frames} samples x {f.channels} channels "
                        "(a header claiming more than the file holds?); lower TEAL_MAX_AUDIO_SECONDS") from None
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read audio ({exc})") from None
    if data.size == 0:
        raise DataError(f"{path}: audio is empty (0 samples)")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: audio contains NaN or infinite samples")
    wave = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)  # mono: no reduction pass (0.18 ms per 10 s)
    return torch.from_numpy(resample(wave, rate, sample_rate))


def check_duration(wave: "torch.Tensor", sample_rate: int, frame_rate: float, path: str | Path, what: str,
                   min_samples: int | None = None) -> None:
    """Refuse audio shorter than one frame of ``what`` (it would give no tokens at all):
    ``min_samples`` (the codec's or extractor's ``min_samples``, its first frame's receptive
    field), else one hop, ``sample_rate / frame_rate``."""
    need = math.ceil(sample_rate / frame_rate) if min_samples is None else min_samples
    if wave.shape[-1] < need:
        raise DataError(f"{path}: audio is {wave.shape[-1]} samples at {sample_rate} Hz, shorter than one "
                        f"{frame_rate:g} Hz frame of {what} ({need} samples)")


def resample(wave: "np.ndarray", rate: int, target: int) -> "np.ndarray":
    import numpy as np

    if rate == target:
        return np.ascontiguousarray(wave, dtype=np.float32)
    import soxr

    return soxr.resample(wave, rate, target, quality="HQ").astype(np.float32, copy=False)


def save_audio(wave: "torch.Tensor", sample_rate: int, path: str | Path) -> None:
    """Write a mono waveform atomically (format from the extension; 16-bit PCM for WAV)."""
    import soundfile as sf

    path = Path(path)
    data = wave.detach().float().clamp(-1, 1).cpu().numpy()
    fmt = {".flac": "FLAC", ".ogg": "OGG"}.get(path.suffix.lower(), "WAV")
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS"}[fmt]
    with atomic_output(path, binary=True) as f:
        sf.write(f, data, sample_rate, format=fmt, subtype=subtype)
