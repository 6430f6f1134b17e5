"""Image geometry for the tokenizers: PIL resizes and crops to uint8 pixels, torch-free.

Everything here runs in loader workers, threads or spawned processes, so it imports neither
torch nor teal's codecs. A codec describes its geometry as a :class:`PixelPrep` (a small
picklable value); the per-pixel value mapping that follows (``/255``, ``map_pixels``, ...)
is a 256-entry table applied on the encoder's device (``ImageCodec.normalize``), which is
exact: every uint8 value is mapped by the same float32 operations the original performs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

RESIZES = ("shorter", "shorter_rounded", "square")


def as_rgb(image: "Image.Image") -> "Image.Image":
    """The image itself when it is RGB already (``convert`` would copy it), else converted."""
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter(image: "Image.Image", size: int, resample: int) -> "Image.Image":
    """``torchvision.transforms.Resize(size, interpolation=resample)`` for a PIL image."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), resample)


def resize_shorter_rounded(image: "Image.Image", size: int, resample: int) -> "Image.Image":
    """The DALL-E usage notebook's resize: both sides scaled by ``size / min(w, h)``, rounded."""
    w, h = image.size
    r = size / min(w, h)
    new_h, new_w = round(r * h), round(r * w)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample)


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
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
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

    def apply(self, image: "Image.Image") -> "tuple[np.ndarray, tuple[int, int] | None]":
        """``(pixels [H, W, 3] uint8, content (H, W) when padded else None)``."""
        import numpy as np

        image = as_rgb(image)
        if self.resize == "shorter":
            image = resize_shorter(image, self.size, self.resample)
        elif self.resize == "shorter_rounded":
            image = resize_shorter_rounded(image, self.size, self.resample)
        elif self.resize == "square":
            image = image.resize((self.size, self.size), self.resample)
        if self.crop:
            image = center_crop(image, self.crop)
        pixels = rgb_array(image)
        m = self.pad_multiple
        h, w = pixels.shape[:2]
        if m > 1 and (h % m or w % m):
            return np.pad(pixels, ((0, -h % m), (0, -w % m), (0, 0)), mode="edge"), (h, w)
        return pixels, None


def load_pixels(prep: PixelPrep, path: "str | Path") -> "tuple[np.ndarray, tuple[int, int] | None]":
    """Read an image file (:func:`teal_cli.media.load_image`) and apply ``prep``: the loader job."""
    from .media import load_image

    return prep.apply(load_image(path))
