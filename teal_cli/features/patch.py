"""Raw pixel patches: the weight-free image features behind ``patch-p{P}-k{K}`` codecs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .base import FeatureExtractor

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from ..media.pixels import PixelPrep


class PatchFeatures(FeatureExtractor):
    """Non-overlapping ``P x P`` RGB patches, flattened channel-major to ``3 * P * P`` values in [0, 1].

    ``image_size`` (optional) is the square size images are resized to before patching;
    None keeps each image's own size (edges padded up to a multiple of P).
    """

    kind = "patch"
    modality = "image"
    invertible = True

    def __init__(self, patch_size: int = 4, image_size: int | None = None):
        if patch_size < 1:
            raise UsageError(f"--patch-size {patch_size}: must be >= 1")
        if image_size is not None and image_size % patch_size:
            raise UsageError(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
        self.patch_size = patch_size
        self.image_size = image_size
        self.dim = 3 * patch_size * patch_size

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> "PatchFeatures":
        return cls(patch_size=int(config["patch_size"]), image_size=config.get("image_size"))

    @classmethod
    def from_name(cls, name: str, patch_size: int = 4, image_size: int | None = None, **_: Any) -> "PatchFeatures":
        return cls(patch_size=patch_size, image_size=image_size)

    def config(self) -> dict[str, Any]:
        return {"kind": "patch", "patch_size": self.patch_size, "image_size": self.image_size}

    def name_stem(self) -> str:
        return f"patch-p{self.patch_size}"

    def pixel_prep(self, image_size: int | None = None) -> "PixelPrep":
        """Resized to ``image_size`` (bicubic) when set, else right/bottom edges replicated up
        to a multiple of the patch size."""
        from PIL import Image

        from ..media.pixels import PixelPrep

        size = image_size or self.image_size
        p = self.patch_size
        if size and size % p:
            raise UsageError(f"--image-size {size} is not a multiple of the patch size {p}")
        if size:
            return PixelPrep("square", size, Image.Resampling.BICUBIC)
        return PixelPrep(pad_multiple=p)

    def pixel_table(self) -> "np.ndarray":
        """``uint8 / 255`` in float32."""
        import numpy as np

        from ..media.image_prep import unit_range

        return unit_range(np.arange(256, dtype=np.uint8))

    def prepare(self, image: "Image.Image", image_size: int | None = None) -> "torch.Tensor":
        """An RGB image to ``[3, H, W]`` in [0, 1] (:meth:`pixel_prep`, then ``/ 255``)."""
        import torch

        pixels, _ = self.pixel_prep(image_size).apply(image)
        table = torch.from_numpy(self.pixel_table())
        return table[torch.from_numpy(pixels.copy()).permute(2, 0, 1).long()]

    def extract(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """``[B, 3, H, W]`` (H, W multiples of P) to ``[B, H/P, W/P, 3*P*P]``."""
        b, c, h, w = pixels.shape
        p = self.patch_size
        if h % p or w % p:
            raise UsageError(f"image of {w}x{h} pixels is not a multiple of the patch size {p}")
        x = pixels.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)

    def invert(self, features: "torch.Tensor") -> "torch.Tensor":
        """``[B, h, w, 3*P*P]`` back to ``[B, 3, h*P, w*P]``."""
        b, gh, gw, _ = features.shape
        p = self.patch_size
        x = features.reshape(b, gh, gw, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 3, gh * p, gw * p)
