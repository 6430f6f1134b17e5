"""Pixel preprocessing shared by the image tokenizers, matching torchvision without it.

The originals preprocess PIL images with torchvision transforms; torchvision pulls a
CUDA torch into CPU environments, so teal reproduces the few transforms used, on PIL,
with the same arithmetic (torchvision applies PIL's own resize to PIL images):

- :func:`resize_shorter` = ``torchvision.transforms.Resize(size)`` on a PIL image: the
  shorter side becomes ``size``, the longer ``int(size * long / short)`` (truncated);
- :func:`resize_shorter_rounded` = the DALL-E / taming notebooks'
  ``TF.resize(img, (round(r * h), round(r * w)))`` with ``r = size / min(w, h)``;
- :func:`center_crop` = ``torchvision.transforms.CenterCrop``: offsets
  ``int(round((dim - crop) / 2))`` (Python's round-half-even), zero padding first when the
  image is smaller than the crop;
- :func:`unit_range` / :func:`to_tensor` = ``ToTensor``: ``uint8 -> float32 / 255`` (a
  division, as torchvision).

Also here: :func:`exact_fp32`, the context the codecs run their fp32 path in, so the same
checkpoint gives the same ids on CPU and GPU as far as floating point allows.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


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


def chw_tensor(array: "np.ndarray") -> "torch.Tensor":
    """An ``[H, W, C]`` array to a contiguous ``[C, H, W]`` tensor."""
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def unit_range(array: "np.ndarray") -> "np.ndarray":
    """``ToTensor``'s values: ``uint8 -> float32 / 255``.

    The per-pixel arithmetic of the codecs runs in numpy rather than torch on purpose: the
    values are bit-identical (same IEEE float32 operations, checked for all 256 inputs in
    the tests), and numpy neither takes the GIL nor starts OpenMP teams, so many loader
    threads preprocess in parallel.
    """
    import numpy as np

    return array.astype(np.float32) / np.float32(255)


def to_tensor(image: "Image.Image") -> "torch.Tensor":
    """``torchvision.transforms.ToTensor``: ``[3, H, W]`` float32 in ``[0, 1]``."""
    return chw_tensor(unit_range(rgb_array(image)))


def check_size(name: str, size: int, multiple: int) -> int:
    """Validate an ``--image-size`` for a fully convolutional codec."""
    from ..errors import UsageError

    if not isinstance(size, int) or size <= 0 or size % multiple:
        raise UsageError(f"codec '{name}': --image-size {size} must be a positive multiple of {multiple}")
    return size


@contextlib.contextmanager
def exact_fp32(device: "torch.device") -> Iterator[None]:
    """Turn TF32 off on CUDA for the block: fp32 means fp32, as on the CPU the originals ran."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def precision(device: "torch.device", dtype: "torch.dtype | None"):
    """The context a codec runs its network in: autocast for half dtypes on CUDA, exact fp32 otherwise."""
    import torch

    from ..device import autocast

    if dtype in (torch.float16, torch.bfloat16) and getattr(device, "type", "") == "cuda":
        return autocast(device, dtype)
    return exact_fp32(device)


def is_half(device: "torch.device", dtype: "torch.dtype | None") -> bool:
    import torch

    return dtype in (torch.float16, torch.bfloat16) and getattr(device, "type", "") == "cuda"
