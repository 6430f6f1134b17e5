"""k-means codecs: a feature extractor plus centroids, stored as a directory.

Layout (written by ``teal cluster``)::

    patch-p4-k512/
      config.json            # format, name, modality, k, dim, features{...}, fit provenance
      centroids.safetensors  # "centroids": [k, dim] float32

The name records provenance (``<extractor stem>-k<K>``, e.g. ``whisper-small-l11-k2048``).
On load the name of the directory is checked against its config: a directory called
``...-l11-k2048`` that holds layer-9 or k=1024 centroids is refused, because a layer or k
mismatch is the commonest silent failure with k-means units.

A Whisper/HuBERT extractor's checkpoint is recorded as an absolute path with its sha256;
on load it is looked for there, relative to the codec directory, and inside it, and used
when its digest matches (``--checkpoint`` points elsewhere; an official download is used
only when its digest is the recorded one). The codec's ``weights_id`` hashes the centroids
file and the stored extractor block, so a refit in place gives new ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CodecError, UsageError
from ..features import build_extractor
from ..features.base import FeatureExtractor
from .base import AudioCodec, ImageCodec

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..media.pixels import PixelPrep

FORMAT = "teal-kmeans-codec"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
CENTROIDS_NAME = "centroids.safetensors"
WEIGHTED_KINDS = ("whisper", "hubert")  # extractors with a checkpoint of their own


class _KMeansMixin:
    """What image and audio k-means codecs share: extractor, centroids, assignment."""

    def __init__(self, name: str, extractor: FeatureExtractor, centroids: "torch.Tensor", config: dict[str, Any]):
        self.name = name
        self.extractor = extractor
        self.centroids = centroids
        self.config = config
        self.vocab_size = int(centroids.shape[0])
        self.has_decoder = extractor.invertible
        self.sample_temperature: float | None = None
        self.sample_seed = 0
        self.generator: "torch.Generator | None" = None

    def sample_codes(self, temperature: float | None, seed: int = 0) -> None:
        """Draw ids from :func:`~teal_cli.cluster.kmeans.sample_assign` at ``temperature`` (squared
        feature units) from now on, seeded by ``seed`` on the device the centroids are on at the
        first draw; ``None``: the nearest centroid again (the default)."""
        self.sample_temperature, self.sample_seed, self.generator = temperature, seed, None

    @property
    def codebook(self) -> "torch.Tensor":
        return self.centroids

    def to(self, device):
        self.device = device
        self.centroids = self.centroids.to(device)
        self.extractor.to(device)
        return self

    def _assign(self, feats: "torch.Tensor") -> "torch.Tensor":
        from .assign import assign, sample_assign

        flat = feats.reshape(-1, feats.shape[-1])
        if self.sample_temperature is not None:
            if self.generator is None or self.generator.device != self.centroids.device:
                import torch

                self.generator = torch.Generator(device=self.centroids.device).manual_seed(self.sample_seed)
            return sample_assign(flat, self.centroids, self.sample_temperature,
                                 generator=self.generator).reshape(feats.shape[:-1])
        ids, _ = assign(flat, self.centroids)
        return ids.reshape(feats.shape[:-1])


class KMeansImageCodec(_KMeansMixin, ImageCodec):
    """Image codec over patch-like features; decodes by centroid lookup when invertible."""

    def __init__(self, name: str, extractor: FeatureExtractor, centroids: "torch.Tensor", config: dict[str, Any]):
        super().__init__(name, extractor, centroids, config)
        self.image_size = getattr(extractor, "image_size", None)
        self.downsample = getattr(extractor, "patch_size", 1)

    def pixel_prep(self, image_size: int | None = None) -> "PixelPrep":
        return self.extractor.pixel_prep(image_size)

    def pixel_table(self) -> "np.ndarray":
        return self.extractor.pixel_table()

    def encode(self, pixels: "torch.Tensor") -> "torch.Tensor":
        return self._assign(self.extractor.extract(pixels.to(self.device)))

    def decode(self, ids: "torch.Tensor") -> "torch.Tensor":
        if not self.has_decoder:
            raise self.no_decoder_error()
        feats = self.centroids[ids.to(self.device)]
        return self.extractor.invert(feats).clamp(0, 1)


class KMeansAudioCodec(_KMeansMixin, AudioCodec):
    """Audio codec over frame features (mel, Whisper, HuBERT)."""

    def __init__(self, name: str, extractor: FeatureExtractor, centroids: "torch.Tensor", config: dict[str, Any]):
        super().__init__(name, extractor, centroids, config)
        self.sample_rate = extractor.sample_rate
        self.frame_rate = extractor.frame_rate

    @property
    def min_samples(self) -> int:
        """The extractor's (:attr:`~teal_cli.features.base.FeatureExtractor.min_samples`)."""
        return self.extractor.min_samples

    def encode(self, waves: "list[torch.Tensor]") -> "list[torch.Tensor]":
        """Ids ``[frames]`` per clip. The batch's frames are assigned together: one distance
        pass (about 10 kernels on a GPU) where one per clip launched that many per clip."""
        import torch

        feats = self.extractor.extract(waves)
        lengths = [f.shape[0] for f in feats]
        if sum(lengths) == 0:
            return [torch.zeros(0, dtype=torch.int64, device=self.device) for _ in feats]
        return list(self._assign(feats[0] if len(feats) == 1 else torch.cat(feats)).split(lengths))

    def decode(self, ids: "torch.Tensor") -> "torch.Tensor":
        if not self.has_decoder:
            raise self.no_decoder_error()
        return self.extractor.invert(self.centroids[ids.to(self.device)])

    def no_decoder_error(self) -> CodecError:
        return CodecError(
            f"codec '{self.name}' has no decoder: {self.extractor.kind} units need a unit vocoder to become sound: "
            f"give `teal detokenize --vocoder CHECKPOINT` a CodeHiFiGAN vocoder trained on these {self.vocab_size} units "
            "(fairseq / speech-resynthesis, config.json beside it), or decode a 'mel' codec instead"
        )


def codec_name(extractor: FeatureExtractor, k: int) -> str:
    return f"{extractor.name_stem()}-k{k}"


def _check_name(directory: Path, config: dict[str, Any]) -> None:
    """Refuse a directory whose provenance name contradicts its config (layer or k)."""
    name = directory.name
    stored = str(config.get("name", ""))
    for tag in ("l", "k", "p"):
        in_dir = re.search(rf"-{tag}(\d+)(?=-|$)", name)
        in_cfg = re.search(rf"-{tag}(\d+)(?=-|$)", stored)
        if in_dir and in_cfg and in_dir.group(1) != in_cfg.group(1):
            what = {"l": "layer", "k": "k", "p": "patch size"}[tag]
            raise CodecError(
                f"{directory}: the directory name says {what} {in_dir.group(1)} but its config.json was fitted with "
                f"{what} {in_cfg.group(1)} (codec '{stored}'); rename the directory or refit"
            )


def features_digest(features: dict[str, Any]) -> str:
    """sha256 of a ``features`` block without where its checkpoint lay (``checkpoint``): the
    extractor's identity, its weights' sha256 included."""
    import hashlib

    block = {k: v for k, v in features.items() if k != "checkpoint"}
    return hashlib.sha256(json.dumps(block, sort_keys=True, default=str).encode()).hexdigest()


def load_codec_dir(directory: str | Path, *, name: str | None = None, features: FeatureExtractor | None = None,
                   checkpoint: str | None = None, config: str | None = None, **extractor_overrides: Any):
    """Load a k-means codec directory.

    ``features`` is an extractor the caller intends to use (e.g. from ``--features ... --layer``);
    it must match the stored one. ``checkpoint`` points a Whisper/HuBERT codec at its
    extractor's weights elsewhere (they must have the recorded sha256). ``name`` is what
    records will carry (default: the directory name). The codec's :attr:`weights_id` hashes
    the centroids file and the stored extractor description (its weights' sha256 included).
    Raises CodecError naming the file for a missing, corrupt or inconsistent directory.
    """
    from ..weights.digests import file_sha256, weights_id
    from ..weights.reader import read_json, read_safetensors

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if config is not None:
        raise UsageError(f"--config {config}: a k-means codec directory ({directory}) takes no model config")
    stored = read_json(config_path, "codec config")
    if stored.get("format") != FORMAT:
        raise CodecError(f"{config_path}: not a teal k-means codec (expected \"format\": \"{FORMAT}\")")
    try:
        version = int(stored.get("version", 0))
    except (TypeError, ValueError):
        raise CodecError(f"{config_path}: 'version' must be an integer, got {stored.get('version')!r:.40}") from None
    if version > FORMAT_VERSION:
        raise CodecError(f"{config_path}: codec format version {stored['version']} is newer than this teal reads")
    _check_name(directory, stored)
    feat_cfg = stored.get("features")
    if not isinstance(feat_cfg, dict):
        raise CodecError(f"{config_path}: missing 'features' block")
    if checkpoint is not None:
        if feat_cfg.get("kind") not in WEIGHTED_KINDS:
            raise UsageError(f"--checkpoint {checkpoint}: codec {directory} uses {feat_cfg.get('kind')} features, "
                             "which have no weights to point elsewhere")
        extractor_overrides["checkpoint"] = checkpoint
    if features is not None:
        features.check_compatible(feat_cfg, str(directory))
        extractor = features
    else:
        extractor = build_extractor(feat_cfg, codec_dir=directory, **extractor_overrides)
    centroids_path = directory / CENTROIDS_NAME
    tensors = read_safetensors(centroids_path)
    if "centroids" not in tensors:
        raise CodecError(f"{centroids_path}: no 'centroids' tensor (found {', '.join(sorted(tensors)[:4]) or 'none'})")
    centroids = tensors["centroids"]
    if not centroids.is_floating_point():
        raise CodecError(f"{centroids_path}: centroids are {centroids.dtype}, expected floats")
    centroids = centroids.to(__import__("torch").float32)
    k, dim = stored.get("k"), stored.get("dim")
    if centroids.ndim != 2 or centroids.shape[0] != k or centroids.shape[1] != dim or dim != extractor.dim:
        raise CodecError(
            f"{centroids_path}: centroids have shape {list(centroids.shape)}, {CONFIG_NAME} says k={k}, dim={dim} "
            f"and the {extractor.kind} extractor gives dim={extractor.dim}"
        )
    if not bool(centroids.isfinite().all()):
        raise CodecError(f"{centroids_path}: centroids hold NaN or infinite values (a damaged file?)")
    cls = KMeansImageCodec if extractor.modality == "image" else KMeansAudioCodec
    codec = cls(name or directory.name, extractor, centroids, stored)
    codec.weights_id = weights_id(file_sha256(centroids_path), features_digest(feat_cfg))
    return codec


def save_codec_dir(directory: str | Path, extractor: FeatureExtractor, centroids: "torch.Tensor",
                   provenance: dict[str, Any]) -> Path:
    """Write a codec directory atomically (a temp directory renamed into place)."""
    import shutil

    from safetensors.torch import save_file

    import teal_cli

    from ..runtime.files import apply_umask, replace_dir, temp_dir_beside

    directory = Path(directory)
    k, dim = centroids.shape
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": codec_name(extractor, int(k)),
        "modality": extractor.modality,
        "k": int(k),
        "dim": int(dim),
        "features": extractor.config(),
        **provenance,
        "teal_version": teal_cli.__version__,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(directory)
    try:
        save_file({"centroids": centroids.detach().float().cpu().contiguous()}, str(tmp / CENTROIDS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        apply_umask(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
