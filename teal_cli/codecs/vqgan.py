"""Taming-transformers VQGAN (``VQModel``): images <-> a grid of codebook ids.

State-dict compatible with CompVis/taming-transformers: ``encoder.*``, ``decoder.*``,
``quantize.embedding.weight`` (``VectorQuantizer2``), ``quant_conv.*``,
``post_quant_conv.*``. Official checkpoints are Lightning files (``last.ckpt``) with the
weights under ``state_dict``; ``loss.*`` (discriminator, LPIPS) and every Lightning extra
are ignored, and nothing in the file is executed (see :mod:`.safe_pickle`). The
architecture comes from the checkpoint's ``model.yaml`` (``model.params``: ``ddconfig``,
``n_embed``, ``embed_dim``) or, without one, from the tensor shapes.

Preprocessing (``preprocess``), as taming's reconstruction notebook and data pipeline:
RGB; shorter side resized to ``image_size`` (default ``ddconfig.resolution``, 256) with
PIL LANCZOS, both sides ``round(scale * side)``; center crop ``image_size`` (torchvision
``CenterCrop`` offsets); values ``x / 127.5 - 1`` on the uint8 pixels (computed in
float64, stored as float32, as taming's ``ImagePaths``; the notebook's ``2 * x - 1`` on
``x / 255`` differs from it by at most 6e-8). The grid is
``image_size / 2**(len(ch_mult) - 1)`` per side (16 x 16 at 256 px for the f16 models).

Encoding: encoder -> ``quant_conv`` -> nearest codebook entry with ``VectorQuantizer2``'s
distance ``|z|^2 + |e|^2 - 2 z.e`` in fp32 and ``argmin`` (first index wins a tie).
Decoding: codebook entry -> ``post_quant_conv`` -> decoder -> ``(clamp(x, -1, 1) + 1) / 2``
(what ``get_codebook_entry`` + ``decode`` give; ``decode_code`` is broken upstream).

Precision: ``dtype=None``/fp32 runs everything in fp32, with TF32 off on CUDA. A half
``dtype`` autocasts the encoder/decoder on CUDA while ``quant_conv`` and the distances stay
fp32; faster, but ids then differ from the fp32 original wherever two codes are nearly
tied (measured on random full-size weights: 95 % agreement for fp16, 75 % for bf16).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CodecError, UsageError
from .base import ImageCodec
from ..media.pixels import PixelPrep
from ..media.image_prep import check_size, precision

if TYPE_CHECKING:
    import numpy as np

DEFAULT_RESOLUTION = 256


# ---------------------------------------------------------------- network


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        # Same operation order as the original, so fp32 results agree bit for bit.
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        k = k.reshape(b, c, hh * ww)
        weights = torch.bmm(q, k) * (int(c) ** (-0.5))
        weights = F.softmax(weights, dim=2)
        v = v.reshape(b, c, hh * ww)
        h = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block`` / ``attn`` lists and an optional resampler (original names)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


def _check_ddconfig(dd: Any, where: Any = "VQGAN config") -> dict:
    """``ddconfig`` with every entry checked (a bad value is a one-line CodecError naming ``where``)."""
    if not isinstance(dd, dict):
        raise CodecError(f"{where}: ddconfig must be a mapping, got {type(dd).__name__}")
    required = ("ch", "ch_mult", "num_res_blocks", "z_channels")
    missing = [k for k in required if k not in dd]
    if missing:
        raise CodecError(f"{where}: VQGAN ddconfig lacks {', '.join(missing)}")
    if not dd.get("resamp_with_conv", True):
        raise CodecError(f"{where}: VQGAN ddconfig: resamp_with_conv=false (average-pool resampling) is not supported")

    def positive(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CodecError(f"{where}: ddconfig.{key} must be a positive integer, got {value!r:.40}")
        return value

    def ints(key: str, value: Any, allow_empty: bool) -> list[int]:
        if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
            raise CodecError(f"{where}: ddconfig.{key} must be a list of positive integers, got {value!r:.40}")
        return [positive(key, v) for v in value]

    out = {
        "ch": positive("ch", dd["ch"]),
        "out_ch": positive("out_ch", dd.get("out_ch", 3)),
        "ch_mult": ints("ch_mult", dd["ch_mult"], False),
        "num_res_blocks": positive("num_res_blocks", dd["num_res_blocks"]),
        "attn_resolutions": ints("attn_resolutions", dd.get("attn_resolutions", []), True),
        "in_channels": positive("in_channels", dd.get("in_channels", 3)),
        "resolution": positive("resolution", dd.get("resolution", DEFAULT_RESOLUTION)),
        "z_channels": positive("z_channels", dd["z_channels"]),
        "double_z": bool(dd.get("double_z", True)),
    }
    if out["ch"] % 32 or any((out["ch"] * m) % 32 for m in out["ch_mult"]):
        raise CodecError(f"{where}: ddconfig.ch {out['ch']} times ch_mult {out['ch_mult']} must be multiples of 32 (GroupNorm)")
    return out


class Encoder(nn.Module):
    def __init__(self, dd: dict):
        super().__init__()
        ch, mult, nres = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
        self.conv_in = nn.Conv2d(dd["in_channels"], ch, 3, 1, 1)
        res, cin_mult = dd["resolution"], (1, *mult)
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level, cin, cout = _Level(), ch * cin_mult[i], ch * m
            for _ in range(nres):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
                if res in dd["attn_resolutions"]:
                    level.attn.append(AttnBlock(cin))
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin)
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * dd["z_channels"] if dd["double_z"] else dd["z_channels"], 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, dd: dict):
        super().__init__()
        ch, mult, nres = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
        cin = ch * mult[-1]
        res = dd["resolution"] // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(dd["z_channels"], cin, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin)
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin)
        levels: list[_Level] = []
        for i in reversed(range(len(mult))):
            level, cout = _Level(), ch * mult[i]
            for _ in range(nres + 1):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
                if res in dd["attn_resolutions"]:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, dd["out_ch"], 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Quantizer(nn.Module):
    """``VectorQuantizer2``'s lookup (no remap, no training terms)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
        """``[B, C, h, w]`` fp32 features to ``[B, h, w]`` nearest-entry ids."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).contiguous().view(-1, c)
        weight = self.embedding.weight
        weight_sq = torch.sum(weight**2, dim=1)
        # Rows are independent; chunking only bounds the [rows, n_embed] distance matrix.
        out = []
        for rows in flat.split(chunk_rows):
            d = torch.sum(rows**2, dim=1, keepdim=True) + weight_sq - 2 * torch.einsum("bd,dn->bn", rows, weight.t())
            out.append(torch.argmin(d, dim=1))
        return torch.cat(out).view(b, h, w)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` ids to ``[B, C, h, w]`` codebook entries."""
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """The parts of taming's ``VQModel`` that tokenize and detokenize."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int, where: Any = "VQGAN config"):
        super().__init__()
        self.ddconfig = _check_ddconfig(ddconfig, where)
        self.n_embed, self.embed_dim = int(n_embed), int(embed_dim)
        self.encoder = Encoder(self.ddconfig)
        self.decoder = Decoder(self.ddconfig)
        self.quantize = Quantizer(self.n_embed, self.embed_dim)
        self.quant_conv = nn.Conv2d(self.ddconfig["z_channels"], self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, self.ddconfig["z_channels"], 1)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)


# ---------------------------------------------------------------- config and checkpoint


def read_config(path: str | Path) -> dict:
    """``model.params`` of a taming ``model.yaml``: ``ddconfig``, ``n_embed``, ``embed_dim``
    (read by :func:`teal_cli.weights.reader.read_yaml`; every value checked)."""
    from ..weights.reader import config_value, read_yaml

    path = Path(path)
    data = read_yaml(path, "VQGAN config")
    model = data.get("model", data)
    if not isinstance(model, dict):
        raise CodecError(f"{path}: 'model' must be a mapping: not a taming VQGAN config")
    target = str(model.get("target", "taming.models.vqgan.VQModel"))
    if not target.endswith("VQModel") or "Gumbel" in target:
        raise CodecError(f"{path}: model.target {target} is not a taming VQModel (only VQModel checkpoints are supported)")
    params = model.get("params", model)
    if not isinstance(params, dict):
        raise CodecError(f"{path}: model.params must be a mapping: not a taming VQGAN config")
    if params.get("remap"):
        raise CodecError(f"{path}: index remapping (params.remap) is not supported")
    for key in ("ddconfig", "n_embed", "embed_dim"):
        if key not in params:
            raise CodecError(f"{path}: model.params.{key} is missing: not a taming VQGAN config")
    return {"ddconfig": _check_ddconfig(params["ddconfig"], path),
            "n_embed": config_value(params, "n_embed", int, f"{path}: model.params", positive=True),
            "embed_dim": config_value(params, "embed_dim", int, f"{path}: model.params", positive=True)}


def infer_config(shapes: dict[str, tuple], resolution: int = DEFAULT_RESOLUTION) -> dict:
    """Rebuild ``ddconfig``/``n_embed``/``embed_dim`` from state-dict shapes.

    Attention levels are found by key; their resolution is given relative to
    ``resolution`` (which only decides where attention sits, not any weight).
    """
    try:
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
        nres = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
        ch_mult = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)]
        z_channels, embed_dim = shapes["post_quant_conv.weight"][:2]
        n_embed = shapes["quantize.embedding.weight"][0]
        double_z = shapes["encoder.conv_out.weight"][0] == 2 * z_channels
        out_ch = shapes["decoder.conv_out.weight"][0]
    except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError) as exc:
        raise CodecError(f"cannot infer the VQGAN architecture from the checkpoint (missing {exc}); pass --config model.yaml") from None
    attn = [resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in shapes]
    ddconfig = {
        "ch": ch, "out_ch": out_ch, "ch_mult": ch_mult, "num_res_blocks": nres, "attn_resolutions": attn,
        "in_channels": in_channels, "resolution": resolution, "z_channels": z_channels, "double_z": double_z,
    }
    return {"ddconfig": ddconfig, "n_embed": n_embed, "embed_dim": embed_dim}


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The model tensors (as :class:`~.safe_pickle.TensorRef`) of a taming checkpoint, ``loss.*`` dropped."""
    from ..weights import safe_pickle
    from ..weights.reader import read_torch

    root = read_torch(path)
    sd = root.get("state_dict", root) if isinstance(root, dict) else None
    if not isinstance(sd, dict):
        raise CodecError(f"{path}: no state_dict in this checkpoint: not a taming VQGAN Lightning checkpoint")
    refs = dict(safe_pickle.iter_tensors(sd))
    return {k: v for k, v in refs.items() if not k.startswith("loss.")}


def build_model(checkpoint: str | Path, config: str | Path | None = None) -> VQModel:
    """A :class:`VQModel` with the weights of ``checkpoint`` (architecture from ``config`` or shapes)."""
    from ..weights.reader import load_into

    refs = read_state_dict(checkpoint)
    if config:
        cfg, where, hint = read_config(config), config, f"its config {config} describes another model"
    else:
        try:
            shapes = {k: tuple(v.shape) for k, v in refs.items()}
            cfg = infer_config(shapes)
        except CodecError as exc:
            raise CodecError(f"{checkpoint}: {exc}") from None
        where, hint = checkpoint, ""
    with torch.device("meta"):
        model = VQModel(cfg["ddconfig"], cfg["n_embed"], cfg["embed_dim"], where)
    return load_into(model, refs, str(checkpoint), hint=hint)


# ---------------------------------------------------------------- codec


def from_uint8(pixels: "np.ndarray") -> "np.ndarray":
    """taming's value mapping: ``uint8 / 127.5 - 1.0`` in float64, stored as float32."""
    import numpy as np

    return (pixels / 127.5 - 1.0).astype(np.float32)



class VQGANCodec(ImageCodec):
    """A taming VQGAN as a teal image codec (see the module docstring for the exact pipeline)."""

    has_decoder = True

    def __init__(self, model: VQModel, name: str = "vqgan", dtype: torch.dtype | None = None):
        self.model = model
        self.name = name
        self.vocab_size = model.n_embed
        self.image_size = model.ddconfig["resolution"]
        self.downsample = model.downsample
        self.dtype = dtype
        self.device = torch.device("cpu")

    @property
    def codebook(self) -> torch.Tensor:
        """``quantize.embedding.weight``: ``[n_embed, embed_dim]``."""
        return self.model.quantize.embedding.weight.detach().float().cpu()

    def pixel_prep(self, image_size: int | None = None) -> PixelPrep:
        from PIL import Image

        size = check_size(self.name, image_size, self.downsample) if image_size else self.image_size
        return PixelPrep("shorter_rounded", size, Image.LANCZOS, crop=size)

    def pixel_table(self) -> "np.ndarray":
        import numpy as np

        return from_uint8(np.arange(256, dtype=np.uint8))

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise UsageError(f"codec '{self.name}': expected pixels [B, 3, H, W], got {list(pixels.shape)}")
        if pixels.shape[2] % self.downsample or pixels.shape[3] % self.downsample:
            raise UsageError(f"codec '{self.name}': image sides must be multiples of {self.downsample}, got {list(pixels.shape[2:])}")

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` preprocessed pixels to ``[B, H/f, W/f]`` int64 ids, on the codec's device."""
        self._check_pixels(pixels)
        x = pixels.to(self.device, torch.float32, non_blocking=True)
        with precision(self.device, self.dtype):
            h = self.model.encoder(x)
        with precision(self.device, None):
            z = self.model.quant_conv(h.float())
            return self.model.quantize.indices(z.float())

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` ids to ``[B, 3, h*f, w*f]`` RGB in ``[0, 1]``, on the CPU."""
        if ids.ndim != 3:
            raise UsageError(f"codec '{self.name}': expected ids [B, h, w], got {list(ids.shape)}")
        self.check_ids(ids, f"codec '{self.name}'")
        ids = ids.to(self.device, torch.long)
        with precision(self.device, None):
            quant = self.model.post_quant_conv(self.model.quantize.lookup(ids))
        with precision(self.device, self.dtype):
            x = self.model.decoder(quant)
        return ((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0).cpu()


def load(
    spec: Any = None,
    *,
    checkpoint_file: Any = None,
    config_file: Any = None,
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    progress: Any = None,
    **_: Any,
) -> VQGANCodec:
    """Registry loader: ``checkpoint``/``config`` paths, else the spec's hub files (downloaded, cached).

    Without ``config`` for a local checkpoint, the architecture is inferred from its shapes.
    """
    name = getattr(spec, "name", None) or "vqgan"
    if checkpoint is None:
        if checkpoint_file is None:
            raise UsageError(f"codec '{name}' needs --checkpoint PATH (a taming last.ckpt)")
        from ..weights.hub import fetch

        checkpoint = fetch(checkpoint_file, progress=progress)
        if config is None and config_file is not None:
            config = fetch(config_file, progress=progress)
    elif config is None:
        # The official layout: <dir>/model.yaml beside it, or ckpts/last.ckpt + configs/model.yaml.
        sibling = [Path(checkpoint).parent / "model.yaml", Path(checkpoint).parent.parent / "configs" / "model.yaml"]
        config = next((p for p in sibling if p.is_file()), None)
    if config is not None and not Path(config).is_file():
        raise UsageError(f"--config {config}: no such file")
    if not Path(checkpoint).is_file():
        raise UsageError(f"--checkpoint {checkpoint}: no such file")
    codec = VQGANCodec(build_model(checkpoint, config), name=name, dtype=dtype)
    codec.weights_files = (str(checkpoint),)
    return codec


__all__ = ["VQGANCodec", "VQModel", "build_model", "infer_config", "load", "read_config", "read_state_dict"]
