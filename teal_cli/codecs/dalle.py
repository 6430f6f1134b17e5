"""OpenAI's DALL-E discrete VAE (dVAE): 256 px images <-> 32 x 32 grids of 8192 ids.

State-dict compatible with openai/DALL-E (``dall_e.encoder.Encoder`` /
``dall_e.decoder.Decoder``: ``blocks.input``, ``blocks.group_N.block_M.{id_path,res_path.conv_K}``,
``blocks.output.conv``; each convolution holds ``w`` and ``b``). The official
``encoder.pkl`` / ``decoder.pkl`` are pickled *modules* that only unpickle on old torch;
teal reads them with :mod:`.safe_pickle`, which rebuilds tensors and never imports or
calls anything the file names, and refuses files that name anything but tensors and
module classes. The architecture (hidden width, blocks per group, vocabulary) comes from
the tensor shapes.

Preprocessing (``preprocess``), as the official ``notebooks/usage.ipynb``: RGB; both
sides scaled by ``256 / min(w, h)`` and rounded, PIL LANCZOS; center crop 256
(torchvision ``CenterCrop``); ``ToTensor`` (``uint8 / 255``); then
``map_pixels(x) = (1 - 2 * 0.1) * x + 0.1``. (The notebook refuses images smaller than
256 px; teal upsamples them the same way.) Grid: ``image_size / 8`` per side.

Encoding: ``argmax`` over the encoder's logits (first index wins a tie). Decoding:
one-hot ids -> decoder -> ``unmap_pixels(sigmoid(x[:, :3]))``; the first decoder layer is a
1 x 1 convolution, so teal applies it to the one-hot input as a column lookup (exactly the
same numbers, 8192 times less work).

Precision: the default (fp32, TF32 off on CUDA) reproduces the original on CPU. On CUDA
the original runs every convolution in fp16 except the encoder's last and the decoder's
first (which run fp32, with TF32 when torch allows it); ``dtype=torch.float16`` runs the
same fp16 blocks, the vocabulary layer in true fp32.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CodecError, UsageError
from .base import ImageCodec
from ..media.pixels import PixelPrep
from ..media.image_prep import check_size, precision, unit_range

LOGIT_LAPLACE_EPS = 0.1
IMAGE_SIZE = 256
DOWNSAMPLE = 8
GROUPS = 4


def map_pixels(x: Any) -> Any:
    """``[0, 1]`` pixels (tensor or float32 array) to the dVAE's input range ``[eps, 1 - eps]``."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to ``[0, 1]``."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv(nn.Module):
    """A same-padded convolution with the original's parameter names ``w`` and ``b``."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class Block(nn.Module):
    """Residual block: ``id_path(x) + post_gain * res_path(x)``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [(n_in, n_hid), (n_hid, n_hid), (n_hid, n_hid), (n_hid, n_out)]
        layers: list[tuple[str, nn.Module]] = []
        for i, ((a, b), k) in enumerate(zip(widths, kernels), start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", Conv(a, b, k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        self.vocab_size = vocab_size
        n_layers = GROUPS * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]  # input, then each group's output
        groups: list[tuple[str, nn.Module]] = [("input", Conv(input_channels, n_hid, 7))]
        for g in range(1, GROUPS + 1):
            blocks: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", Block(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers, (3, 3, 3, 1)))
                for i in range(n_blk_per_group)
            ]
            if g != GROUPS:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(8 * n_hid, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the last (vocabulary) convolution."""
        for name, module in self.blocks.named_children():
            if name == "output":
                return module.relu(x)
            x = module(x)
        return x

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.blocks.output.conv(features)


class Decoder(nn.Module):
    def __init__(self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, output_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        self.vocab_size = vocab_size
        n_layers = GROUPS * n_blk_per_group
        widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
        groups: list[tuple[str, nn.Module]] = [("input", Conv(vocab_size, n_init, 1))]
        for g in range(1, GROUPS + 1):
            blocks: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", Block(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers, (1, 3, 3, 3)))
                for i in range(n_blk_per_group)
            ]
            if g != GROUPS:
                blocks.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(n_hid, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def first_layer(self, ids: torch.Tensor) -> torch.Tensor:
        """The 1 x 1 input convolution applied to one-hot ``ids`` ``[B, h, w]``, as a lookup."""
        table = self.blocks.input.w[:, :, 0, 0]  # [n_init, vocab]
        # Left channels-last on purpose: the original's one-hot input is a permuted view, so
        # its convolutions run channels-last, and so must ours for the same rounding.
        return (table.t()[ids] + self.blocks.input.b).permute(0, 3, 1, 2)

    def rest(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return x


# ---------------------------------------------------------------- checkpoints


def _read_module(path: Path, kind: str) -> dict[str, Any]:
    """Tensor refs of a pickled DALL-E module (or of a plain state dict) in ``path``."""
    from ..weights import safe_pickle
    from ..weights.reader import read_torch

    root = read_torch(path)
    if isinstance(root, safe_pickle.Placeholder):
        expected = f"dall_e.{kind.lower()}"
        if root.module != expected or root.qualname != kind:
            raise CodecError(f"{path}: holds {root.module}.{root.qualname}, expected a pickled {expected}.{kind}")
        return safe_pickle.module_tensors(root)
    if isinstance(root, dict):
        refs = dict(safe_pickle.iter_tensors(root.get("state_dict", root)))
        if refs:
            return refs
    raise CodecError(f"{path}: neither a pickled DALL-E {kind} nor a state dict")


def _shape(refs: dict[str, Any], key: str, path: Path, rank: int = 4) -> tuple:
    if key not in refs:
        raise CodecError(f"{path}: {key} is missing: not a DALL-E dVAE checkpoint")
    shape = tuple(refs[key].shape)
    if len(shape) != rank or not all(shape):
        raise CodecError(f"{path}: {key} has shape {list(shape)}, expected a {rank}-d convolution weight")
    return shape


def _blocks_per_group(refs: dict[str, Any]) -> int:
    return len({k.split(".")[2] for k in refs if k.startswith("blocks.group_1.block_")})


def _load_strict(model: nn.Module, refs: dict[str, Any], path: Path) -> nn.Module:
    from ..weights.reader import load_into

    return load_into(model, refs, str(path))


def read_encoder(path: str | Path) -> Encoder:
    path = Path(path)
    refs = _read_module(path, "Encoder")
    n_hid, input_channels = _shape(refs, "blocks.input.w", path)[:2]
    vocab = _shape(refs, "blocks.output.conv.w", path)[0]
    with torch.device("meta"):
        model = Encoder(n_hid, _blocks_per_group(refs), input_channels, vocab)
    return _load_strict(model, refs, path)


def read_decoder(path: str | Path) -> Decoder:
    path = Path(path)
    refs = _read_module(path, "Decoder")
    n_init, vocab = _shape(refs, "blocks.input.w", path)[:2]
    n_hid = _shape(refs, "blocks.group_4.block_1.res_path.conv_4.w", path)[0]
    output_channels = _shape(refs, "blocks.output.conv.w", path)[0] // 2
    with torch.device("meta"):
        model = Decoder(n_init, n_hid, _blocks_per_group(refs), output_channels, vocab)
    return _load_strict(model, refs, path)


# ---------------------------------------------------------------- codec


class DalleCodec(ImageCodec):
    """The DALL-E dVAE as a teal image codec (see the module docstring for the exact pipeline)."""

    image_size = IMAGE_SIZE
    downsample = DOWNSAMPLE

    def __init__(self, encoder: Encoder, decoder: Decoder | None = None, name: str = "dalle", dtype: torch.dtype | None = None):
        if decoder is not None and decoder.vocab_size != encoder.vocab_size:
            raise CodecError(f"DALL-E encoder has {encoder.vocab_size} codes but the decoder {decoder.vocab_size}")
        self.encoder, self.decoder = encoder, decoder
        self.name = name
        self.vocab_size = encoder.vocab_size
        self.has_decoder = decoder is not None
        self.dtype = dtype
        self.device = torch.device("cpu")

    @property
    def codebook(self) -> torch.Tensor:
        """The decoder's first 1 x 1 convolution, transposed: ``[vocab, 128]``."""
        if self.decoder is None:
            raise CodecError(f"codec '{self.name}': the DALL-E codebook is the decoder's first layer, and no decoder.pkl was loaded")
        return self.decoder.blocks.input.w.detach()[:, :, 0, 0].t().float().cpu().contiguous()

    @property
    def codebook_note(self) -> str:
        return (
            "DALL-E's dVAE has no explicit codebook: this is the decoder's first 1x1 convolution "
            "(the vector each id contributes to the decoder input), transposed to [8192, 128]"
        )

    def pixel_prep(self, image_size: int | None = None) -> PixelPrep:
        from PIL import Image

        size = check_size(self.name, image_size, DOWNSAMPLE) if image_size else IMAGE_SIZE
        return PixelPrep("shorter_rounded", size, Image.LANCZOS, crop=size)

    def pixel_table(self) -> np.ndarray:
        # ToTensor then map_pixels: the same float32 operations as the torch original.
        return map_pixels(unit_range(np.arange(256, dtype=np.uint8)))

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` mapped pixels to ``[B, H/8, W/8]`` int64 ids, on the codec's device."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % DOWNSAMPLE or pixels.shape[3] % DOWNSAMPLE:
            raise UsageError(f"codec '{self.name}': expected pixels [B, 3, H, W] with sides multiples of {DOWNSAMPLE}, got {list(pixels.shape)}")
        x = pixels.to(self.device, torch.float32, non_blocking=True)
        with precision(self.device, self.dtype):
            h = self.encoder.features(x)
        with precision(self.device, None):  # the vocabulary layer stays fp32, as in the original
            return self.encoder.logits(h.float()).argmax(dim=1)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` ids to ``[B, 3, 8h, 8w]`` RGB in ``[0, 1]``, on the CPU."""
        if self.decoder is None:
            raise CodecError(f"codec '{self.name}': no decoder.pkl was loaded, so ids cannot be turned back into pixels")
        if ids.ndim != 3:
            raise UsageError(f"codec '{self.name}': expected ids [B, h, w], got {list(ids.shape)}")
        self.check_ids(ids, f"codec '{self.name}'")
        ids = ids.to(self.device, torch.long)
        with precision(self.device, None):
            x = self.decoder.first_layer(ids)
        with precision(self.device, self.dtype):
            stats = self.decoder.rest(x)
        return unmap_pixels(torch.sigmoid(stats.float()[:, :3])).cpu()


def _locate(checkpoint: str | Path) -> tuple[Path, Path | None]:
    path = Path(checkpoint)
    if path.is_dir():
        encoder = path / "encoder.pkl"
        if not encoder.is_file():
            raise UsageError(f"--checkpoint {path}: a DALL-E folder must hold encoder.pkl (and decoder.pkl)")
        decoder = path / "decoder.pkl"
    else:
        if not path.is_file():
            raise UsageError(f"--checkpoint {path}: no such file")
        encoder, decoder = path, path.with_name("decoder.pkl")
    return encoder, decoder if decoder.is_file() and decoder != encoder else None


def load(
    spec: Any = None,
    *,
    encoder_file: Any = None,
    decoder_file: Any = None,
    checkpoint: str | Path | None = None,
    dtype: torch.dtype | None = None,
    progress: Any = None,
    **_: Any,
) -> DalleCodec:
    """Registry loader: ``checkpoint`` is a folder with ``encoder.pkl`` + ``decoder.pkl`` or the
    encoder file (``decoder.pkl`` beside it is picked up); else the official files are fetched."""
    name = getattr(spec, "name", None) or "dalle"
    if checkpoint is not None:
        encoder_path, decoder_path = _locate(checkpoint)
    else:
        if encoder_file is None:
            raise UsageError(f"codec '{name}' needs --checkpoint (a folder with encoder.pkl and decoder.pkl)")
        from ..weights.hub import fetch

        encoder_path = fetch(encoder_file, progress=progress)
        decoder_path = fetch(decoder_file, progress=progress) if decoder_file is not None else None
    encoder = read_encoder(encoder_path)
    decoder = read_decoder(decoder_path) if decoder_path is not None else None
    codec = DalleCodec(encoder, decoder, name=name, dtype=dtype)
    codec.weights_files = (str(encoder_path),)  # the encoder makes the ids; its decoder goes with it
    return codec


__all__ = ["DalleCodec", "Decoder", "Encoder", "load", "map_pixels", "read_decoder", "read_encoder", "unmap_pixels"]
