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
    import torch
    from PIL import Image


class Codec:
    """Base of all codecs.

    Attributes:
        name: the name records carry (``segment.codec``); resolvable by the registry.
        modality: ``"image"`` or ``"audio"``.
        vocab_size: number of ids; valid ids are ``[0, vocab_size)``.
        has_decoder: whether :meth:`decode` exists.
    """

    name: str = ""
    modality: str = ""
    vocab_size: int = 0
    has_decoder: bool = False
    device: "torch.device | str" = "cpu"

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

    def preprocess(self, image: "Image.Image", image_size: int | None = None) -> "torch.Tensor":
        """An RGB PIL image to the ``[3, H, W]`` float tensor :meth:`encode` expects.

        ``image_size`` overrides :attr:`image_size` for codecs that allow it.
        """
        raise NotImplementedError

    def content_size(self, image: "Image.Image", image_size: int | None = None) -> "tuple[int, int] | None":
        """``(H, W)`` of the real content when :meth:`preprocess` pads the image, else None.

        Tokenize records it as the segment's ``size`` so decoding can crop the padding off.
        """
        return None

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

    def encode(self, waves: "list[torch.Tensor]") -> "list[torch.Tensor]":
        """Mono float waveforms at :attr:`sample_rate` to one int64 id vector each."""
        raise NotImplementedError

    def decode(self, ids: "torch.Tensor") -> "torch.Tensor":
        """An int64 id vector (one id per frame) to a mono float waveform at :attr:`sample_rate`."""
        raise self.no_decoder_error()

    def segment_fields(self) -> dict[str, Any]:
        rate = self.frame_rate
        return {"frame_rate": int(rate) if float(rate).is_integer() else rate}
