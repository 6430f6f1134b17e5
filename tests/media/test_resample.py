"""teal_cli.media.resample reproduces Pillow's resize + crop byte for byte for the window a crop
keeps (the path of thin images whose whole resize would not fit in memory)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from teal_cli.media import resample
from teal_cli.media.resample import BICUBIC, BILINEAR, BOX, HAMMING, LANCZOS, resize_window_host, window_source

pytestmark = pytest.mark.skipif(resample.exact_here() is not None, reason=str(resample.exact_here()))


def _image(rng, w, h, smooth):
    """Noise (every weight and both clip ends matter), or a gradient with noise."""
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if smooth:
        ramp = np.linspace(0, 190, w, dtype=np.float64)[None, :, None]
        pixels = (pixels // 4 + ramp).astype(np.uint8)
    return pixels


@pytest.mark.parametrize("resample_filter", [BICUBIC, LANCZOS, BILINEAR, BOX, HAMMING])
def test_resize_and_crop_equal_pillow(resample_filter):
    rng = np.random.default_rng(resample_filter)
    for trial in range(14):
        w, h, rw, rh = (int(v) for v in rng.integers(1, 400, 4))
        if trial == 0:
            rw, rh = w, h  # no resize: a crop alone
        elif trial == 1:
            h, rh = max(h, 200), 20  # the height shrinks most: vertical pass first from Pillow 13
        ow, oh = int(rng.integers(1, rw + 1)), int(rng.integers(1, rh + 1))
        left, top = int(rng.integers(0, rw - ow + 1)), int(rng.integers(0, rh - oh + 1))
        pixels = _image(rng, w, h, trial % 2)
        expected = np.asarray(Image.fromarray(pixels).resize((rw, rh), resample_filter).crop((left, top, left + ow, top + oh)))
        window = (rw, rh, left, top, ow, oh)
        out = resize_window_host(pixels, window, resample_filter)
        assert out.dtype == np.uint8 and out.shape == (oh, ow, 3)
        assert np.array_equal(out, expected), (w, h, *window)
        # Given only the part of the image the window reads, as PixelPrep.apply does.
        x0, y0, x1, y1 = window_source(w, h, window, resample_filter)
        part = resize_window_host(pixels[y0:y1, x0:x1], window, resample_filter, (w, h, x0, y0))
        assert np.array_equal(part, expected), (w, h, *window)


def test_pass_order_follows_the_installed_pillow():
    major = int(Image.__version__.split(".")[0])
    assert resample.horizontal_first(100, 100, 50, 50)
    assert resample.horizontal_first(300, 1000, 224, 746) == (major < 13)


def test_resize_on_device_is_gone(photo, patch_codec, cli):
    """``--resize-on`` (the device resize) was removed: a usage error, exit 2."""
    bad = cli("tokenize", photo, "--codec", patch_codec, "--resize-on", "device")
    assert bad.exit_code == 2 and "--resize-on" in bad.stderr
