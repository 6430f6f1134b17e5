"""The codec interface: one modality to token ids and, where possible, back.

Two families share it. :class:`ImageCodec` works on batches of equal-size pixel tensors
(``[B, 3, H, W]``, values in ``[0, 1]``) and returns id grids ``[B, h, w]``.
:class:`AudioCodec` works on lists of mono waveforms at ``sample_rate`` and returns one id
vector per clip, at ``frame_rate`` ids per second.

Preprocessing that belongs to a codec (resize/crop, value mapping) lives in the codec, so
a checkpoint always sees exactly what its original code fed it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CodecError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from ..media.pixels import PixelPrep


class Codec:
    """Base of all codecs.

    Attributes:
        name: the name records carry (``segment.codec``); resolvable by the registry.
        modality: ``"image"`` or ``"audio"``.
        vocab_size: number of ids; valid ids are ``[0, vocab_size)``.
        has_decoder: whether :meth:`decode` exists.
        weights_id: which exact weights the codec runs (see :attr:`weights_id`).
        weights_files: the checkpoint files loaded, which :attr:`weights_id` hashes when no
            id was set (loaders set one or the other).
    """

    name: str = ""
    modality: str = ""
    vocab_size: int = 0
    has_decoder: bool = False
    device: "torch.device | str" = "cpu"
    weights_files: "tuple[str, ...]" = ()

    @property
    def weights_id(self) -> str:
        """16 hex digits of the sha256 of the weights this codec runs (empty: unknown, e.g. a
        plugin that sets none). Built-in codecs: the checkpoint file(s) loaded (DALL-E: the
        encoder, which makes the ids), the pinned digest for official files that have one;
        k-means codec directories: the centroids file plus the extractor's description and
        weights digest. Token segments carry it as ``weights``; see :func:`check_segment_weights`.
        Computed on first use (hashing is cached by :func:`teal_cli.weights.digests.file_sha256`)."""
        value = self.__dict__.get("_weights_id")
        if value is None:
            from ..weights.digests import files_sha256, weights_id

            files = tuple(self.__dict__.get("weights_files", ()) or ())
            value = weights_id(files_sha256(files)) if files else ""
            self.__dict__["_weights_id"] = value
        return value

    @weights_id.setter
    def weights_id(self, value: str) -> None:
        self.__dict__["_weights_id"] = str(value or "")[:16]

    @property
    def codebook(self) -> "torch.Tensor":
        """The ``[vocab_size, d]`` matrix used to initialise a model's embeddings."""
        raise NotImplementedError

    @property
    def codebook_note(self) -> str:
        """What :attr:`codebook` is, when it is not a plain quantizer codebook."""
        return ""

    def to(self, device: "torch.device | str") -> "Codec":
        """Move the weights (every ``torch.nn.Module`` attribute) to ``device``; returns self."""
        import torch

        self.device = torch.device(device)
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(self.device)
        return self

    def no_decoder_error(self) -> CodecError:
        return CodecError(f"codec '{self.name}' has no decoder: its tokens cannot be turned back into {self.modality}")

    def check_ids(self, ids: "torch.Tensor", where: str) -> None:
        """Raise a clear error if any id is outside ``[0, vocab_size)``."""
        if ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = hi if hi >= self.vocab_size else lo
            raise CodecError(f"{where}: token id {bad} is out of range for codec '{self.name}' (vocab_size {self.vocab_size})")

    def segment_fields(self) -> dict[str, Any]:
        """Extra fields every segment of this codec carries (e.g. ``frame_rate``)."""
        return {}


def check_segment_weights(segment: Any, codec: Codec, where: str) -> None:
    """Refuse to decode (or embed) token ids made by other weights than ``codec``'s.

    ``segment`` is a :class:`~teal_cli.records.Segment` or its JSON dict; its ``weights``
    field (16 hex digits, written by ``teal tokenize``) is compared with
    :attr:`Codec.weights_id`. A segment without the field (records from before it existed)
    or a codec whose weights are unknown is accepted. Raises :class:`CodecError`, one line
    naming ``where``, both ids and the fix.
    """
    recorded = segment.get("weights") if isinstance(segment, dict) else getattr(segment, "weights", None)
    if not recorded:
        return
    mine = codec.weights_id
    if not mine:
        return
    n = min(len(recorded), len(mine))
    if str(recorded)[:n].lower() != mine[:n].lower():
        raise CodecError(
            f"{where}: tokens were made by codec '{codec.name}' with weights {recorded}, but the weights loaded "
            f"for it are {mine}: their ids would decode to something else; load the same checkpoint "
            "(--checkpoint FILE whose sha256 starts with that id) or re-tokenize"
        )


class ImageCodec(Codec):
    """Images to id grids.

    Attributes:
        image_size: the native input size (square, pixels) the codec resizes to, or None
            when it keeps the input size (it must then be a multiple of :attr:`downsample`).
        downsample: pixels per token along each side.
    """

    modality = "image"
    image_size: int | None = None
    downsample: int = 1

    def pixel_prep(self, image_size: int | None = None) -> "PixelPrep":
        """The codec's geometry (resize, crop, pad) from a PIL image to uint8 pixels.

        ``image_size`` overrides :attr:`image_size` for codecs that allow it (others raise
        a UsageError). The result is picklable and torch-free: loader processes run it.
        """
        raise NotImplementedError

    def pixel_table(self) -> "np.ndarray":
        """The encoder input value of each uint8 pixel value: float32 ``[256]`` (all
        channels alike) or ``[3, 256]``, computed with the original's float32 operations."""
        raise NotImplementedError

    def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """``[B, H, W, 3]`` uint8 pixels to the ``[B, 3, H, W]`` float32 input of :meth:`encode`,
        on the device of ``pixels``, by lookup in :meth:`pixel_table`: exact, and the same
        values on every device (arithmetic on a GPU may round differently)."""
        import torch

        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"normalize expects [B, H, W, 3] uint8 pixels, got {pixels.dtype} {list(pixels.shape)}")
        tables = self.__dict__.setdefault("_pixel_tables", {})
        table = tables.get(pixels.device)
        if table is None:
            values = torch.from_numpy(self.pixel_table()).float()
            values = values.expand(3, 256) if values.dim() == 1 else values
            table = tables[pixels.device] = values.contiguous().to(pixels.device)
        # One lookup per channel: half the time of one lookup with channel offsets on a CPU
        # (64 x 224 x 224: 35 ms against 78), no slower on a GPU.
        out = torch.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=torch.float32, device=pixels.device)
        for c in range(3):
            out[:, c] = table[c][pixels[..., c].long()]
        return out

    def preprocess(self, image: "Image.Image", image_size: int | None = None) -> "torch.Tensor":
        """An RGB PIL image to the ``[3, H, W]`` float tensor :meth:`encode` expects:
        :meth:`pixel_prep`, then :meth:`normalize`."""
        import torch

        pixels, _ = self.pixel_prep(image_size).apply(image)
        return self.normalize(torch.from_numpy(pixels.copy())[None])[0]

    def encode(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """``[B, 3, H, W]`` preprocessed pixels to ``[B, h, w]`` int64 ids."""
        raise NotImplementedError

    def decode(self, ids: "torch.Tensor") -> "torch.Tensor":
        """``[B, h, w]`` ids to ``[B, 3, H, W]`` RGB in ``[0, 1]``."""
        raise self.no_decoder_error()


class AudioCodec(Codec):
    """Waveforms to id sequences.

    Attributes:
        sample_rate: the rate, in Hz, that inputs are resampled to.
        frame_rate: ids per second of audio.
    """

    modality = "audio"
    sample_rate: int = 16000
    frame_rate: float = 50.0

    @property
    def min_samples(self) -> int:
        """The shortest waveform (samples at :attr:`sample_rate`) that gives at least one id;
        shorter clips are refused when loaded (:func:`teal_cli.media.io.check_duration`). By
        default one frame's hop; codecs whose first frame needs more say so."""
        import math

        return math.ceil(self.sample_rate / self.frame_rate)

    def encode(self, waves: "list[torch.Tensor]") -> "list[torch.Tensor]":
        """Mono float waveforms at :attr:`sample_rate` to one int64 id vector each."""
        raise NotImplementedError

    def decode(self, ids: "torch.Tensor") -> "torch.Tensor":
        """An int64 id vector (one id per frame) to a mono float waveform at :attr:`sample_rate`."""
        raise self.no_decoder_error()

    def segment_fields(self) -> dict[str, Any]:
        rate = self.frame_rate
        return {"frame_rate": int(rate) if float(rate).is_integer() else rate}
