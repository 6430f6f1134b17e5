"""Helpers shared by the image-tokenizer tests (test_vqgan, test_dalle, test_beit2).

Not a conftest: imported by name. The reference packages (taming-transformers-rom1504,
DALL-E) are test dependencies installed with ``pip install --no-deps -r
requirements-test-image.txt``; when one is missing, the oracle tests fail and say so.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

INSTALL_HINT = "install the reference packages: pip install --no-deps -r requirements-test-image.txt"



def reference(module: str) -> types.ModuleType:
    """Import a module of a reference package, or fail the test saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"reference package missing ({exc}): {INSTALL_HINT}", pytrace=False)


def smooth_image(seed: int, width: int, height: int) -> Image.Image:
    """A random image with structure (blobs + edges + noise), so resizing filters matter."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(max(2, height // 8), max(2, width // 8), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float64)
    noise = rng.normal(0, 12, size=(height, width, 3))
    array = np.clip(base + noise, 0, 255).astype(np.uint8)
    array[:, width // 3] = 255  # a hard edge
    return Image.fromarray(array, "RGB")


def torchvision_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision.transforms.CenterCrop on a PIL image, written out from its definition."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor_reference(image: Image.Image) -> torch.Tensor:
    """torchvision.transforms.ToTensor on an RGB PIL image."""
    array = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


class _Marker:
    """Pickles to a call of ``os.system`` that would create ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def malicious_pickle(marker_path: str) -> bytes:
    """A pickle that runs ``touch marker_path`` when loaded by an unrestricted unpickler."""
    return pickle.dumps({"state_dict": {"x": _Marker(marker_path)}}, protocol=2)


def malicious_torch_file(path: str, marker_path: str, legacy: bool = False) -> None:
    """A torch.save file (zip or legacy) whose pickle calls os.system."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Marker(marker_path)}, path, _use_new_zipfile_serialization=not legacy)


def fake_lightning_callback_class() -> type:
    """A class living at pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint.

    Real Lightning checkpoints key their ``callbacks`` dict by the callback class; pickle
    stores it by name, which is what teal must survive without importing Lightning.
    """
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so the dotted import works
            sys.modules[name] = module
    module = sys.modules[names[-1]]
    if not hasattr(module, "ModelCheckpoint"):
        cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
        module.ModelCheckpoint = cls
    return module.ModelCheckpoint


def drop_fake_lightning() -> None:
    for name in ["pytorch_lightning.callbacks.model_checkpoint", "pytorch_lightning.callbacks", "pytorch_lightning"]:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None) is None:
            del sys.modules[name]
