"""Feature extractors: the frozen front half of a k-means codec.

A k-means codec is a feature extractor plus centroids. ``teal cluster`` fits the centroids
on extracted features; tokenizing assigns each feature vector to its nearest centroid.

Extractors describe themselves with :meth:`FeatureExtractor.config`, which the codec
directory stores; loading a codec rebuilds the extractor from it and
:meth:`FeatureExtractor.check_compatible` refuses a mismatch (wrong layer, wrong model) —
the commonest silent failure with k-means units.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CodecError, UsageError

if TYPE_CHECKING:
    import torch


class FeatureExtractor:
    """Turns media into feature vectors.

    Image extractors map ``[B, 3, H, W]`` pixels (``[0, 1]``) to ``[B, h, w, dim]``.
    Audio extractors map a list of mono waveforms at :attr:`sample_rate` to a list of
    ``[frames, dim]`` tensors at :attr:`frame_rate`.

    Attributes:
        kind: registry key (``patch``, ``mel``, ``whisper``, ``hubert``).
        modality: ``image`` or ``audio``.
        dim: feature size.
        invertible: whether :meth:`invert` turns (quantized) features back into media.
    """

    kind: str = ""
    modality: str = ""
    dim: int = 0
    invertible: bool = False
    sample_rate: int = 16000
    frame_rate: float = 50.0
    device: "torch.device | str" = "cpu"

    def config(self) -> dict[str, Any]:
        """JSON-able description, enough for :func:`~teal_cli.features.build_extractor`."""
        raise NotImplementedError

    def name_stem(self) -> str:
        """Provenance prefix of codec names, e.g. ``patch-p4`` or ``whisper-small-l11``."""
        raise NotImplementedError

    def to(self, device: "torch.device | str") -> "FeatureExtractor":
        self.device = device
        return self

    def extract(self, batch: Any) -> Any:
        raise NotImplementedError

    def invert(self, features: "torch.Tensor") -> "torch.Tensor":
        """Features (e.g. centroids looked up by id) back to media."""
        raise CodecError(f"'{self.kind}' features cannot be turned back into {self.modality}")

    def check_compatible(self, stored: dict[str, Any], where: str) -> None:
        """Raise if a codec directory's stored extractor config differs from this one."""
        mine = self.config()
        for key, value in stored.items():
            if key in mine and mine[key] != value:
                raise CodecError(
                    f"{where}: codec was fitted on {self.kind} features with {key}={value!r}, "
                    f"but the extractor given has {key}={mine[key]!r}"
                )


def check_layer(layer: "int | str | None", depth: int, model: str, *, default: int, unit: str, final_note: str = "") -> "int | str":
    """Validate ``--layer`` against a model's depth.

    ``N`` is the output of ``unit`` N counted from 1 (0: its input); ``final`` is the model's
    last output (after its final norm); None gives ``default``.
    """
    if layer is None:
        return default
    if isinstance(layer, str):
        if layer.strip().lower() == "final":
            return "final"
        try:
            layer = int(layer)
        except ValueError:
            raise UsageError(f"--layer {layer}: expected a {unit} number 0..{depth} or 'final'") from None
    if not 0 <= layer <= depth:
        raise UsageError(f"--layer {layer}: {model} has {depth} {unit}s; expected 0..{depth} "
                         f"(N = output of {unit} N counted from 1) or 'final'{final_note}")
    return layer
