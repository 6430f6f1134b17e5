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

# The PIL geometry lives in teal_cli.pixels (torch-free, so loader processes can run it).
from ..pixels import as_rgb, center_crop, resize_shorter, resize_shorter_rounded, rgb_array  # noqa: F401

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


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
