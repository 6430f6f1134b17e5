"""Pillow's image resize, bit for bit, on uint8 tensors on any torch device.

The originals resize with Pillow (``Image.resize``) before their encoders, and the ids
depend on every pixel, so a resize elsewhere must give Pillow's exact bytes. Pillow resamples
8-bit images in two passes, horizontal then vertical, each in fixed point:

- per output pixel, weights from the filter (support scaled by the reduction factor,
  normalised to sum 1) are computed in double precision, then rounded to integers with 22
  fractional bits (:func:`axis_weights` repeats those operations in the same order, with the
  same C math library);
- each output is ``clip(floor((2**21 + sum(pixel * weight)) / 2**22), 0, 255)``, an exact
  integer computation, which gives the same result in any order of the sums. Here either
  batched float64 matrix products (the weights over ``2**22``: every partial sum is then an
  integer times ``2**-22``, held exactly) or int32 gathers and multiply-adds, one per filter
  tap (Pillow's own accumulator type); :func:`matmul_suits` picks by device.

So :func:`resize_window` equals ``image.resize(...)`` followed by a crop, exactly; the tests
compare the two over many sizes, filters and contents, both ways. It serves images of
different sizes in one batch (one product, or one set of gathers per tap, for all of them),
which is what lets a GPU take the resizing off the CPU loaders. The weights come from the same double-precision
expressions only where the compiler did not fuse multiply-adds in Pillow's build: true of
x86-64 wheels (SSE2, no FMA), not guaranteed elsewhere.

The order of the two passes is Pillow's and depends on its version: horizontal first up to
Pillow 12; from Pillow 13 vertical first when the height shrinks by more than twice as many
pixels as the width (:func:`horizontal_first`). :func:`exact_here` says whether this
platform and Pillow version are ones whose rules are known here.
"""

from __future__ import annotations

import math
import platform
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5  # PIL.Image.Resampling values


KNOWN_PILLOW = (6, 13)  # major versions whose resampling this module follows


def _pillow_major() -> int:
    import PIL

    return int(PIL.__version__.split(".")[0])


def exact_here() -> str | None:
    """None when :func:`resize_window` gives the installed Pillow's bytes here; else why not."""
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


@lru_cache(maxsize=8192)
def axis_weights(in_size: int, out_size: int, resample: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Pillow's fixed-point weights for resizing one axis from ``in_size`` to ``out_size``:
    ``(first input index per output, integer weights per output)``.

    An axis whose size does not change is left alone by Pillow; it gets the identity here
    (weight ``2**22`` on the pixel itself), which gives the same bytes."""
    return axis_weights_range(in_size, out_size, resample, 0, out_size)


def axis_weights_range(in_size: int, out_size: int, resample: int, first: int,
                       count: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """:func:`axis_weights` of outputs ``first`` .. ``first + count - 1`` only: the same
    numbers, in work proportional to ``count`` (a thin image's resize target can have
    millions of outputs along an axis of which a crop keeps a few hundred)."""
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
    ``first + count - 1`` of :func:`axis_weights`; unused taps point at the first input
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
    """:func:`resize_window` of one ``[H, W, 3]`` (or ``[H, W, 4]``) uint8 numpy image, in
    numpy (torch-free, for the loaders): ``[oh, ow, 3]`` uint8, Pillow's bytes, with work and
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


def _pass(x: "torch.Tensor", index: "torch.Tensor", value: "torch.Tensor", dim: int) -> "torch.Tensor":
    """One fixed-point pass along ``dim`` (1: rows, 2: columns) of int32 ``x [B, H, W, 3]``,
    with per-image taps ``index``/``value`` ``[B, outputs, taps]``: a gather and an int32
    multiply-add per tap."""
    import torch

    b, outputs, taps = index.shape
    shape = [b, x.shape[1], x.shape[2], 3]
    shape[dim] = outputs
    view = (b, outputs, 1, 1) if dim == 1 else (b, 1, outputs, 1)
    acc = None
    for t in range(taps):
        picked = torch.gather(x, dim, index[:, :, t].reshape(view).expand(shape))
        weight = value[:, :, t].reshape(view)
        if acc is None:
            acc = picked.mul_(weight).add_(1 << (PRECISION_BITS - 1))
        else:
            acc.addcmul_(picked, weight)  # exact: int32 throughout
    return acc.div_(1 << PRECISION_BITS, rounding_mode="floor").clamp_(0, 255)


# Devices whose float64 matrix products are fast: CPUs and the data-centre GPUs (P100, V100,
# A100, H100/H200, B200: compute capability X.0). Consumer GPUs run float64 at 1/32-1/64 of
# float32, and there the gathers (memory-bound) win.
FAST_FLOAT64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def matmul_suits(device: "torch.device") -> bool:
    """Whether :func:`resize_window` does its passes as float64 matrix products on ``device``
    (else as int32 gathers, one per filter tap)."""
    import torch

    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) in FAST_FLOAT64


def _dense(index: "torch.Tensor", value: "torch.Tensor", in_size: int) -> "torch.Tensor":
    """Taps ``[B, outputs, taps]`` as float64 matrices ``[B, outputs, in_size]`` of the weights
    over ``2**22`` (zero off the filter's support; unused taps add weight 0)."""
    import torch

    dense = torch.zeros((*index.shape[:2], in_size), dtype=torch.float64, device=index.device)
    return dense.scatter_add_(2, index, value.to(torch.float64).mul_(2.0 ** -PRECISION_BITS))


def _round(acc: "torch.Tensor") -> "torch.Tensor":
    """``(sum + 2**21) / 2**22`` (exact in float64) to pixel values, in place: Pillow's
    ``clip8(sum >> 22)``."""
    return acc.floor_().clamp_(0, 255)


def _resize_matmul(x: "torch.Tensor", columns, rows, horizontal_first: bool) -> "torch.Tensor":
    """Both passes over uint8 ``x [B, H, W, 3]`` as batched float64 matrix products, in
    Pillow's order: ``[B, oh, ow, 3]`` uint8.

    Exact: the weights enter divided by ``2**22`` (a power of two: exact), so every product
    and partial sum is an integer (pixel <= 255 times a weight < 2**23, summed) times
    ``2**-22``, far inside float64's 53 bits: float64 holds them all, and the order of the
    sums does not matter, as with int32. The rounding constant (``2**21``, here 0.5) enters as
    the products' bias. The image is laid out ``[B, H, 3, W]`` once, so that the horizontal
    pass is ``[B, H*3, W] @ [B, W, ow]`` and the vertical one ``[B, oh, H] @ [B, H, 3*W']``,
    with no transposes between them: far fewer memory passes than the gathers (two per tap
    and pass).
    """
    import torch

    b, h, w, _ = x.shape
    ow, oh = columns[0].shape[1], rows[0].shape[1]
    cols = _dense(*columns, w).transpose(1, 2)  # [B, W, ow]
    rws = _dense(*rows, h)  # [B, oh, H]
    half = torch.full((1, 1, 1), 0.5, dtype=torch.float64, device=x.device)
    planes = x.permute(0, 1, 3, 2).to(torch.float64, memory_format=torch.contiguous_format)  # [B, H, 3, W]
    if horizontal_first:
        across = _round(torch.baddbmm(half, planes.view(b, h * 3, w), cols))  # [B, H*3, ow]
        out = _round(torch.baddbmm(half, rws, across.view(b, h, 3 * ow)))  # [B, oh, 3*ow]
    else:
        down = _round(torch.baddbmm(half, rws, planes.view(b, h, 3 * w)))  # [B, oh, 3*W]
        out = _round(torch.baddbmm(half, down.view(b, oh * 3, w), cols))  # [B, oh*3, ow]
    return out.view(b, oh, 3, ow).permute(0, 1, 3, 2).to(torch.uint8, memory_format=torch.contiguous_format)


def resize_window(images: "Sequence[np.ndarray | torch.Tensor]", windows: Sequence[tuple[int, int, int, int, int, int]],
                  resample: int, device: "torch.device | str | None" = None, *, matmul: bool | None = None) -> "torch.Tensor":
    """``image.resize((rw, rh), resample).crop((left, top, left + ow, top + oh))`` of each
    ``[H, W, 3]`` uint8 image, as Pillow computes it: ``[B, oh, ow, 3]`` uint8 on ``device``.
    ``[H, W, 4]`` images are RGB plus a padding byte, dropped (:func:`teal_cli.media.pixels.rgbx_array`).

    ``windows[i]`` is ``(rw, rh, left, top, ow, oh)`` (:meth:`~teal_cli.media.pixels.PixelPrep.window`);
    every window has the same ``(ow, oh)``. Images are numpy arrays or host tensors (gathered,
    padded to the largest, into one pinned buffer and uploaded at once), or tensors already
    on ``device``. ``matmul`` picks how the passes run (default: :func:`matmul_suits`); both
    give the same bytes.
    """
    import numpy as np
    import torch

    from ..runtime.device import pack, unpack, upload, upload_flat

    if not images:
        raise ValueError("resize_window: no images")
    if len(images) != len(windows) or len({w[4:] for w in windows}) != 1:
        raise ValueError("resize_window: one window per image, all of one output size")
    on_host = all(isinstance(im, np.ndarray) or im.device.type == "cpu" for im in images)
    device = torch.device(device) if device is not None else torch.device("cpu") if on_host else images[0].device
    ow, oh = windows[0][4:]
    hmax = max(int(im.shape[0]) for im in images)
    wmax = max(int(im.shape[1]) for im in images)
    # Padding is never read (the taps only point inside each image), so it is left unset, and
    # host images bound for a device travel packed end to end: their bytes only, in one pinned
    # upload. On a CPU they are copied straight into the batch.
    pixels = torch.empty((len(images), hmax, wmax, 3), dtype=torch.uint8, device=device)
    shapes = [tuple(int(v) for v in im.shape) for im in images]
    if on_host and device.type != "cpu":
        images = unpack(upload(pack(images, torch.uint8, pin_memory=device.type == "cuda"), device), images)
    host = pixels.numpy() if device.type == "cpu" else None
    for i, (im, (h, w, c)) in enumerate(zip(images, shapes)):
        if isinstance(im, np.ndarray):  # on a CPU (decoded images are read-only: no tensor over them)
            host[i, :h, :w] = im.reshape(h, w, c)[..., :3]
        else:
            pixels[i, :h, :w] = im.reshape(h, w, c)[..., :3]
    columns = [window_taps(shape[1], w[0], resample, w[2], ow) for shape, w in zip(shapes, windows)]
    rows = [window_taps(shape[0], w[1], resample, w[3], oh) for shape, w in zip(shapes, windows)]

    def taps(parts):
        # Gathered into pinned buffers and uploaded asynchronously: a copy from pageable
        # memory would make the host wait for the device's earlier work.
        width = max(p[0].shape[1] for p in parts)
        shape = (len(parts), parts[0][0].shape[0], width)
        pinned = device.type == "cuda"
        index = torch.zeros(shape, dtype=torch.int64, pin_memory=pinned)
        value = torch.zeros(shape, dtype=torch.int32, pin_memory=pinned)
        index_np, value_np = index.numpy(), value.numpy()
        for i, (ix, v) in enumerate(parts):
            index_np[i, :, : ix.shape[1]] = ix
            value_np[i, :, : v.shape[1]] = v
        return upload(index, device), upload(value, device)

    if matmul is None:
        matmul = matmul_suits(device)
    resize = _resize_matmul if matmul else _resize
    order = [horizontal_first(shape[1], shape[0], w[0], w[1]) for shape, w in zip(shapes, windows)]
    if len(set(order)) == 1:
        return resize(pixels, taps(columns), taps(rows), order[0])
    # Both pass orders in one batch (tall images with Pillow 13): each group on its own.
    out = torch.empty((len(images), oh, ow, 3), dtype=torch.uint8, device=device)
    for first in (True, False):
        chosen = [i for i, o in enumerate(order) if o == first]
        where = upload_flat([torch.tensor(chosen)], device)[0]
        out[where] = resize(pixels.index_select(0, where), taps([columns[i] for i in chosen]),
                            taps([rows[i] for i in chosen]), first)
    return out


def _resize(x: "torch.Tensor", columns, rows, horizontal_first: bool) -> "torch.Tensor":
    """Both passes over uint8 ``x`` as int32 gathers (:func:`_pass`), in Pillow's order."""
    import torch

    x = x.to(torch.int32)
    if horizontal_first:
        return _pass(_pass(x, *columns, dim=2), *rows, dim=1).to(torch.uint8)
    return _pass(_pass(x, *rows, dim=1), *columns, dim=2).to(torch.uint8)
