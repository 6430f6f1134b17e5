"""A disk cache of extracted features, so a ``teal cluster --k`` sweep extracts once.

Layout::

    DIR/<extractor stem>-<hash of its config>/
        extractor.json            the extractor's config (for people; the hash decides)
        <sha256(key)[:32]>.safetensors   one tensor "features" [frames, dim] per input

The folder name hashes the extractor's whole config (model, weights sha256, layer,
normalisation...), so features of another layer or model are never reused; the checkpoint's
location is left out of the hash, since the sha256 already names the weights. Each file
records its key and, when the key is an existing file, that file's size and mtime: an edited
input is a miss, not stale features. Writes go to a temporary file renamed into place, so
parallel ranks and interrupted runs never leave half a file; the folders of several ranks
merge by copying their files together.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..runtime.files import write_atomic

if TYPE_CHECKING:
    import torch

    from ..features.base import FeatureExtractor

_VOLATILE = ("checkpoint",)  # where the weights were found: not what they are


def config_hash(config: dict[str, Any]) -> str:
    """Short stable digest of an extractor config (location-only keys left out)."""
    kept = {k: v for k, v in config.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureCache:
    """Features of one extractor, one safetensors file per input id.

    Attributes:
        folder: where this extractor's features live.
        hits, misses: counts of :meth:`get` calls that found / did not find features.
    """

    def __init__(self, root: str | Path, extractor: "FeatureExtractor", dtype: "torch.dtype | None" = None):
        config = extractor.config()
        self.folder = Path(root).expanduser() / f"{extractor.name_stem()}-{config_hash(config)}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = getattr(extractor, "dim", 0)
        self.dtype = dtype
        self.hits = 0
        self.misses = 0
        description = self.folder / "extractor.json"
        if not description.is_file():
            write_atomic(description, (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode())

    def path(self, key: str) -> Path:
        return self.folder / (hashlib.sha256(key.encode("utf-8")).hexdigest()[:32] + ".safetensors")

    @staticmethod
    def _stamp(key: str) -> dict[str, str]:
        try:
            stat = os.stat(key)
        except (OSError, ValueError):
            return {}
        return {"size": str(stat.st_size), "mtime_ns": str(stat.st_mtime_ns)}

    def get(self, key: str) -> "torch.Tensor | None":
        """The cached ``[frames, dim]`` tensor for input ``key``, or None (a miss)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or any(meta.get(k) != v for k, v in self._stamp(key).items()):
                    self.misses += 1
                    return None
                features = f.get_tensor("features")
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path}: unreadable cached features ({exc}); delete the file") from None
        if features.dim() != 2 or (self.dim and features.shape[1] != self.dim):
            raise DataError(f"{path}: cached features have shape {tuple(features.shape)}, expected [frames, {self.dim}]")
        self.hits += 1
        return features

    def put(self, key: str, features: "torch.Tensor") -> None:
        """Store ``features`` ([frames, dim]) for ``key``, atomically."""
        from safetensors.torch import save

        if features.dim() != 2:
            raise ValueError(f"features must be [frames, dim], got shape {tuple(features.shape)}")
        tensor = features.detach().to("cpu", self.dtype or features.dtype).contiguous()
        if not tensor.is_floating_point():
            raise ValueError(f"features must be a float tensor, got {tensor.dtype}")
        data = save({"features": tensor}, metadata={"key": key, **self._stamp(key)})
        write_atomic(self.path(key), data)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.safetensors"))

