"""Value mapping and precision shared by the image tokenizers.

The geometry (resize, crop: the originals' torchvision transforms reproduced on PIL) lives
in :mod:`teal_cli.media.pixels`, torch-free so loader processes can run it. Here:

- :func:`unit_range` = ``ToTensor``'s values, ``uint8 -> float32 / 255`` (a division, as
  torchvision); codecs build their 256-entry value tables from it (``pixel_table``);
- :func:`exact_fp32` / :func:`precision`, the context the codecs run their networks in, so
  the same checkpoint gives the same ids on CPU and GPU as far as floating point allows.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import numpy as np
    import torch


def unit_range(array: "np.ndarray") -> "np.ndarray":
    """``ToTensor``'s values: ``uint8 -> float32 / 255`` (numpy; the same IEEE float32
    operation as torch's, checked for all 256 inputs in the tests)."""
    import numpy as np

    return array.astype(np.float32) / np.float32(255)


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

    from ..runtime.device import autocast

    if dtype in (torch.float16, torch.bfloat16) and getattr(device, "type", "") == "cuda":
        return autocast(device, dtype)
    return exact_fp32(device)


def is_half(device: "torch.device", dtype: "torch.dtype | None") -> bool:
    import torch

    return dtype in (torch.float16, torch.bfloat16) and getattr(device, "type", "") == "cuda"
