"""Feature extractors: the frozen front half of a k-means codec.

A k-means codec is a feature extractor plus centroids. ``teal cluster`` fits the centroids
on extracted features; tokenizing assigns each feature vector to its nearest centroid.

Extractors describe themselves with :meth:`FeatureExtractor.config`, which the codec
directory stores; loading a codec rebuilds the extractor from it and
:meth:`FeatureExtractor.check_compatible` refuses a mismatch (wrong layer, wrong model) —
the commonest silent failure with k-means units.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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

    @property
    def min_samples(self) -> int:
        """Audio: the shortest waveform, in samples at :attr:`sample_rate`, that gives at
        least one frame (from the extractor's own frame rule: its receptive field, windows,
        padding). Shorter clips are refused before extraction (:func:`teal_cli.media.io.check_duration`)
        rather than tokenized to nothing. This default is one hop, ``sample_rate / frame_rate``;
        extractors whose first frame needs more override it."""
        import math

        return math.ceil(self.sample_rate / self.frame_rate)

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


def _recorded_candidates(recorded: str, codec_dir: Path | None) -> list[Path]:
    """Where a codec's recorded checkpoint may be: the path itself when absolute; else beside
    the codec directory, then from the working folder (codecs made before paths were stored
    absolute); and a file or folder of that name inside the codec directory."""
    if not recorded:
        return []
    path = Path(recorded).expanduser()
    found = [path] if path.is_absolute() else [*([codec_dir / path] if codec_dir else []), Path.cwd() / path]
    if codec_dir is not None and path.name:
        found.append(codec_dir / path.name)
    out: list[Path] = []
    for p in found:
        if p not in out:
            out.append(p)
    return out


def find_recorded(config: dict[str, Any], codec_dir: Path | None, where: str, kind: str,
                  official: Callable[[], Any] | None, locate: Callable[[str], tuple[Path, str, list[Path]]]) -> Any:
    """The weights a codec's ``features`` block recorded, located on this machine.

    The recorded checkpoint (see :func:`_recorded_candidates`) is used when it exists and its
    sha256 is the recorded one; else ``official()`` (the named official download, which the
    caller offers only when its digest is the recorded one); else CodecError naming the
    recorded path and sha256 and the fix (``--checkpoint``). Returns ``(path, fmt, files,
    sha)`` of the recorded copy, or what ``official()`` returned.
    """
    from ..weights.digests import files_sha256

    recorded, sha = str(config.get("checkpoint") or ""), str(config.get("sha256") or "")
    tried: list[str] = []
    for candidate in _recorded_candidates(recorded, codec_dir):
        if not candidate.exists():
            continue
        try:
            path, fmt, files = locate(str(candidate))
            digest = files_sha256(files)
        except (CodecError, UsageError) as exc:
            tried.append(f"{candidate} is unusable ({exc})")
            continue
        if sha and digest != sha:
            tried.append(f"{candidate} has sha256 {digest[:16]}...")
            continue
        return path, fmt, files, digest
    if official is not None:
        return official()
    state = "; ".join(tried) if tried else "not found"
    raise CodecError(f"{where}: the {kind} weights it was fitted on are missing: recorded checkpoint "
                     f"{recorded or '(none recorded)'} (sha256 {sha or 'not recorded'}): {state}; "
                     "pass --checkpoint PATH to a copy of those weights")
