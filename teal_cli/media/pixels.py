"""Image geometry for the tokenizers: PIL resizes and crops to uint8 pixels, torch-free.

Everything here runs in loader workers, threads or spawned processes, so it imports neither
torch nor teal's codecs. A codec describes its geometry as a :class:`PixelPrep` (a small
picklable value); the per-pixel value mapping that follows (``/255``, ``map_pixels``, ...)
is a 256-entry table applied on the encoder's device (``ImageCodec.normalize``), which is
exact: every uint8 value is mapped by the same float32 operations the original performs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

RESIZES = ("shorter", "shorter_rounded", "square")
# Largest resize target (pixels) computed whole. A thin image's "shorter side to 256" can be
# enormous (1 x 200,000 px -> 256 x 51,200,000, 39 GB) although only a centre crop is kept:
# above this, only the kept window is resized (PixelPrep.apply), the same bytes.
MAX_RESIZED_PIXELS = 1 << 24


def as_rgb(image: "Image.Image") -> "Image.Image":
    """The image itself when it is RGB already (``convert`` would copy it), else converted."""
    return image if image.mode == "RGB" else image.convert("RGB")


def shorter_size(w: int, h: int, size: int) -> tuple[int, int]:
    """``(w, h)`` after :func:`resize_shorter`."""
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return w, h
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def resize_shorter(image: "Image.Image", size: int, resample: int) -> "Image.Image":
    """``torchvision.transforms.Resize(size, interpolation=resample)`` for a PIL image."""
    new = shorter_size(*image.size, size)
    return image if new == image.size else image.resize(new, resample)


def shorter_rounded_size(w: int, h: int, size: int) -> tuple[int, int]:
    """``(w, h)`` after :func:`resize_shorter_rounded`."""
    r = size / min(w, h)
    return round(r * w), round(r * h)


def resize_shorter_rounded(image: "Image.Image", size: int, resample: int) -> "Image.Image":
    """The DALL-E usage notebook's resize: both sides scaled by ``size / min(w, h)``, rounded."""
    new = shorter_rounded_size(*image.size, size)
    return image if new == image.size else image.resize(new, resample)


def crop_origin(w: int, h: int, size: int) -> tuple[int, int]:
    """``(left, top)`` of :func:`center_crop` in an image at least ``size`` on each side."""
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def center_crop(image: "Image.Image", size: int) -> "Image.Image":
    """``torchvision.transforms.CenterCrop(size)`` for a PIL image."""
    w, h = image.size
    if w < size or h < size:
        from PIL import Image as PILImage

        left, top = (size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0
        padded = PILImage.new(image.mode, (max(w, size), max(h, size)))
        padded.paste(image, (left, top))
        image, (w, h) = padded, padded.size
        if w == size and h == size:
            return image
    left, top = crop_origin(w, h, size)
    return image.crop((left, top, left + size, top + size))


def rgb_array(image: "Image.Image") -> "np.ndarray":
    """An image as an ``[H, W, 3]`` uint8 array (RGB)."""
    import numpy as np

    return np.asarray(as_rgb(image), dtype=np.uint8)


@dataclass(frozen=True)
class PixelPrep:
    """How one codec turns a PIL image into ``[H, W, 3]`` uint8 pixels.

    Attributes:
        resize: ``shorter`` (:func:`resize_shorter`), ``shorter_rounded``
            (:func:`resize_shorter_rounded`), ``square`` (both sides to ``size``), or None.
        size: the target of ``resize``.
        resample: the PIL filter (``Image.Resampling`` value).
        crop: side of the center crop (:func:`center_crop`), or None.
        pad_multiple: right/bottom edges replicated up to a multiple of this (patch codecs);
            the unpadded ``(H, W)`` is then returned as the content size.
    """

    resize: str | None = None
    size: int | None = None
    resample: int = 3  # Image.Resampling.BICUBIC
    crop: int | None = None
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        if self.resize not in (None, *RESIZES):
            raise ValueError(f"PixelPrep.resize={self.resize!r}: expected one of {', '.join(RESIZES)} or None")
        if self.resize is not None and not self.size:
            raise ValueError("PixelPrep: resize needs a size")

    @property
    def fixed_shape(self) -> "tuple[int, int, int] | None":
        """``(H, W, 3)`` of every output when it does not depend on the image (a crop or a
        square resize), else None."""
        if self.crop:
            side = self.crop
        elif self.resize == "square":
            side = self.size
        else:
            return None
        side = -(-side // self.pad_multiple) * self.pad_multiple
        return (side, side, 3)

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """``(w, h)`` of an image of that size after :attr:`resize`."""
        if self.resize == "shorter":
            return shorter_size(w, h, self.size)
        if self.resize == "shorter_rounded":
            return shorter_rounded_size(w, h, self.size)
        if self.resize == "square":
            return self.size, self.size
        return w, h

    def _crop_window(self, rw: int, rh: int) -> "tuple[int, int, int, int] | None":
        """``(left, top, width, height)`` of the crop in a ``rw x rh`` resized image, when a
        crop keeps a window of it (no padding) and its filter has a finite support; else None."""
        from .resample import FILTERS

        if not self.crop or rw < self.crop or rh < self.crop or self.resample not in FILTERS:
            return None
        return (*crop_origin(rw, rh, self.crop), self.crop, self.crop)

    def apply(self, image: "Image.Image", where: str = "image") -> "tuple[np.ndarray, tuple[int, int] | None]":
        """``(pixels [H, W, 3] uint8, content (H, W) when padded else None)``.

        A resize target above ``MAX_RESIZED_PIXELS`` (a thin image's shorter side brought to
        the codec's size) is computed for the crop's window only
        (:func:`teal_cli.media.resample.resize_window_host`: Pillow's bytes, where
        :func:`~teal_cli.media.resample.exact_here`); without a crop to bound it, it is a
        :class:`DataError` naming ``where``."""
        import numpy as np

        image = as_rgb(image)
        w, h = image.size
        rw, rh = self.resized_size(w, h)
        if (rw, rh) != (w, h) and rw * rh > MAX_RESIZED_PIXELS:
            window = self._crop_window(rw, rh)
            if window is None:
                raise DataError(f"{where}: resizing {w}x{h} to {rw}x{rh} ({rw * rh} pixels) is over the limit "
                                f"of {MAX_RESIZED_PIXELS} pixels, and this geometry keeps all of it; "
                                "crop or shrink the image first")
            from PIL import Image as PILImage

            from .resample import resize_window_host, window_source

            box = window_source(w, h, (rw, rh, *window), self.resample)
            pixels = resize_window_host(rgb_array(image.crop(box)), (rw, rh, *window), self.resample, (w, h, *box[:2]))
            image, rw, rh = PILImage.fromarray(pixels, "RGB"), self.crop, self.crop
        if (rw, rh) != image.size:  # resize_shorter, resize_shorter_rounded or square
            image = image.resize((rw, rh), self.resample)
        if self.crop:
            image = center_crop(image, self.crop)
        pixels = rgb_array(image)
        m = self.pad_multiple
        h, w = pixels.shape[:2]
        if m > 1 and (h % m or w % m):
            return np.pad(pixels, ((0, -h % m), (0, -w % m), (0, 0)), mode="edge"), (h, w)
        return pixels, None
