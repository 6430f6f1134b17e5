"""Pillow's image resize, bit for bit, for the window of a resize that a crop keeps.

A thin image's "shorter side to 256" can be enormous (1 x 200,000 px -> 256 x 51,200,000,
39 GB) although the codec keeps only a centre crop; :func:`resize_window_host` computes that
crop alone, with Pillow's exact bytes (the ids depend on every pixel). Pillow's ``box``
argument does not give them. Pillow resamples 8-bit images in two passes, each in fixed
point:

- per output pixel, weights from the filter (support scaled by the reduction factor,
  normalised to sum 1) are computed in double precision, then rounded to integers with 22
  fractional bits (:func:`axis_weights_range` repeats those operations in the same order,
  with the same C math library);
- each output is ``clip(floor((2**21 + sum(pixel * weight)) / 2**22), 0, 255)``, an exact
  integer computation, which gives the same result in any order of the sums.

The weights come from the same double-precision expressions only where the compiler did not
fuse multiply-adds in Pillow's build: true of x86-64 wheels (SSE2, no FMA), not guaranteed
elsewhere. The order of the two passes is Pillow's and depends on its version: horizontal
first up to Pillow 12; from Pillow 13 vertical first when the height shrinks by more than
twice as many pixels as the width (:func:`horizontal_first`). :func:`exact_here` says
whether this platform and Pillow version are ones whose rules are known here.
"""

from __future__ import annotations

import math
import platform
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5  # PIL.Image.Resampling values


KNOWN_PILLOW = (6, 13)  # major versions whose resampling this module follows


def _pillow_major() -> int:
    import PIL

    return int(PIL.__version__.split(".")[0])


def exact_here() -> str | None:
    """None when :func:`resize_window_host` gives the installed Pillow's bytes here; else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"Pillow's resize weights are only reproduced on x86-64 (this is {platform.machine()})"
    major = _pillow_major()
    if not KNOWN_PILLOW[0] <= major <= KNOWN_PILLOW[1]:
        return f"Pillow {major}.x resamples in ways not checked here (known: {KNOWN_PILLOW[0]}-{KNOWN_PILLOW[1]})"
    return None


def horizontal_first(w: int, h: int, rw: int, rh: int) -> bool:
    """Whether the installed Pillow resizes ``w x h`` to ``rw x rh`` horizontal pass first."""
    if _pillow_major() < 13:
        return True
    return not (h - rh > 0 and h - rh > (w - rw) * 2)


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


_F054, _F046 = 0.5400000214576721, 0.46000000834465027  # the C source's 0.54f, 0.46f as doubles


def _hamming(x: float) -> float:
    x = -x if x < 0.0 else x
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_F054 + _F046 * math.cos(x))


def _bicubic(x: float) -> float:
    a = -0.5
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


FILTERS = {BOX: (_box, 0.5), BILINEAR: (_bilinear, 1.0), HAMMING: (_hamming, 1.0), BICUBIC: (_bicubic, 2.0),
           LANCZOS: (_lanczos, 3.0)}


def axis_weights_range(in_size: int, out_size: int, resample: int, first: int,
                       count: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Pillow's fixed-point weights for resizing one axis from ``in_size`` to ``out_size``,
    outputs ``first`` .. ``first + count - 1`` only: ``(first input index per output,
    integer weights per output)``, in work proportional to ``count`` (a thin image's resize
    target can have millions of outputs along an axis of which a crop keeps a few hundred).
    An axis whose size does not change gets the identity (Pillow leaves it alone)."""
    if resample not in FILTERS:
        raise ValueError(f"resample filter {resample}: expected one of {sorted(FILTERS)} (nearest is not supported)")
    if in_size == out_size:
        return tuple(range(first, first + count)), ((1 << PRECISION_BITS,),) * count
    fn, base_support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    inv = 1.0 / filterscale
    one = float(1 << PRECISION_BITS)
    starts, weights = [], []
    for xx in range(first, first + count):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        taps = min(int(center + support + 0.5), in_size) - xmin
        k = [fn((x + xmin - center + 0.5) * inv) for x in range(taps)]
        total = 0.0
        for w in k:  # in order, as the C loop adds them
            total += w
        if total != 0.0:
            k = [w / total for w in k]
        starts.append(xmin)
        weights.append(tuple(int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in k))
    return tuple(starts), tuple(weights)


@lru_cache(maxsize=8192)
def window_taps(in_size: int, out_size: int, resample: int, first: int, count: int) -> "tuple[np.ndarray, np.ndarray]":
    """Input indices and weights ``[count, taps]`` (int64, int32) of outputs ``first`` ..
    ``first + count - 1`` of :func:`axis_weights_range`; unused taps point at the first input
    with weight 0. Cached: treat the arrays as read-only."""
    import numpy as np

    starts, weights = axis_weights_range(in_size, out_size, resample, first, count)
    taps = max(len(w) for w in weights)
    index = np.zeros((count, taps), np.int64)
    value = np.zeros((count, taps), np.int32)
    for row, (start, w) in enumerate(zip(starts, weights)):
        index[row, : len(w)] = np.arange(start, start + len(w))
        value[row, : len(w)] = w
    return index, value


def window_source(w: int, h: int, window: tuple[int, int, int, int, int, int], resample: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)``: the part of a ``w x h`` image that the resize window
    ``window`` (``(rw, rh, left, top, ow, oh)``) reads, filter support included."""
    rw, rh, left, top, ow, oh = window
    x0, x1 = _reads(w, rw, resample, left, ow)
    y0, y1 = _reads(h, rh, resample, top, oh)
    return x0, y0, x1, y1


def _reads(in_size: int, out_size: int, resample: int, first: int, count: int) -> tuple[int, int]:
    """The span of inputs that outputs ``first`` .. ``first + count - 1`` of one axis read."""
    if in_size == out_size:
        return first, first + count
    starts, weights = axis_weights_range(in_size, out_size, resample, first, count)
    return min(starts), max(start + len(k) for start, k in zip(starts, weights))


def resize_window_host(pixels: "np.ndarray", window: tuple[int, int, int, int, int, int], resample: int,
                       source: "tuple[int, int, int, int] | None" = None) -> "np.ndarray":
    """``Image.resize((rw, rh))`` then a crop of ``(left, top, ow, oh)`` (``window``) of one
    ``[H, W, 3]`` uint8 numpy image, in numpy (torch-free, for the loaders): ``[oh, ow, 3]``
    uint8, Pillow's bytes, with work and
    memory bounded by the window rather than by the resize target ``rw x rh``.

    ``source`` is ``(w, h, x, y)`` when ``pixels`` is only the part of a ``w x h`` image from
    ``(x, y)`` on, covering at least :func:`window_source` (so that a caller converts only
    that part of a large image to an array). Pillow's two passes in its order
    (:func:`horizontal_first`): the first runs only on the source rows (or columns) the
    second reads; an axis whose size does not change is not resampled (Pillow skips it
    too). Each pass sums ``pixel * weight`` in int64 (exact) with the weights of
    :func:`window_taps`, then ``clip((sum + 2**21) >> 22, 0, 255)``."""
    import numpy as np

    rw, rh, left, top, ow, oh = window
    w, h, x0, y0 = source if source is not None else (pixels.shape[1], pixels.shape[0], 0, 0)

    def one_pass(x: "np.ndarray", axis: int, in_size: int, out_size: int, first: int, count: int,
                 origin: int) -> "np.ndarray":
        # ``x`` holds the axis from input ``origin`` on (at least the part the taps read)
        if in_size == out_size:
            return x[first - origin : first - origin + count] if axis == 0 else x[:, first - origin : first - origin + count]
        index, value = window_taps(in_size, out_size, resample, first, count)
        acc = None
        for t in range(index.shape[1]):
            at = np.clip(index[:, t] - origin, 0, x.shape[axis] - 1)  # unused taps (weight 0) point at input 0
            picked = (x[at] if axis == 0 else x[:, at]).astype(np.int64)
            weight = value[:, t].astype(np.int64).reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
            acc = picked * weight if acc is None else acc + picked * weight
        return np.clip((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255).astype(np.uint8)

    x = pixels[..., :3]
    if horizontal_first(w, h, rw, rh):
        r0, r1 = _reads(h, rh, resample, top, oh)
        across = one_pass(x[r0 - y0 : r1 - y0], 1, w, rw, left, ow, x0)
        return np.ascontiguousarray(one_pass(across, 0, h, rh, top, oh, r0))
    c0, c1 = _reads(w, rw, resample, left, ow)
    down = one_pass(x[:, c0 - x0 : c1 - x0], 0, h, rh, top, oh, y0)
    return np.ascontiguousarray(one_pass(down, 1, w, rw, left, ow, c0))
