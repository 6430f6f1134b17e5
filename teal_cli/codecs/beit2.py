"""BEiT-v2's VQ-KD visual tokenizer: 224 px images -> 14 x 14 grids of 8192 ids.

State-dict compatible with microsoft/unilm ``beit2/modeling_vqkd.py`` (``VQKD`` used as a
tokenizer): a ViT encoder (``encoder.*``: patch embedding, class token, absolute position
embeddings, pre-norm blocks with q/v biases, mean-pooling ``fc_norm`` applied to the patch
tokens), the task layer ``encode_task_layer`` (Linear, Tanh, Linear to 32 dims) and the
codebook ``quantize.embedding.weight`` (l2-normalised, ``NormEMAVectorQuantizer``).
Official ``.pth`` files keep the weights under ``model``; as the original loader does,
``loss*``, ``teacher*`` and ``scaling*`` keys are dropped. The decoder and the EMA
statistics are present in the file but not used: BEiT-v2 tokens are for understanding
only, there is no pixel decoder. Depth, width, MLP width, patch size, grid and codebook
size come from the tensor shapes; heads from width / 64 (all official models), or the
``num_heads`` option.

Preprocessing (``preprocess``), as the original ``test_get_code.py`` plus
``VQKD.pre_process`` (process type ``default``): RGB; ``Resize(256, bicubic)`` (shorter side
256, longer ``int(256 * long / short)``, PIL BICUBIC); ``CenterCrop(224)``; ``ToTensor``
(``uint8 / 255``); then ``x * 255 / 127.5 - 1`` (the original scales a batch whose maximum
is <= 1 by 255 first). No ImageNet mean/std normalisation. Fixed 224 px (the position
embeddings are not interpolated).

Encoding: ViT features -> task layer (fp32) -> l2-normalise -> nearest codebook entry by
``|z|^2 + |e|^2 - 2 z.e`` in fp32, ``argmin`` (first index wins a tie).

Precision: the default fp32 path (TF32 off on CUDA) follows the original's order of
operations. A half ``dtype`` autocasts the ViT on CUDA (fused attention) while the task
layer and the lookup stay fp32, as the original's autocast-off block does.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CodecError, UsageError
from .base import ImageCodec
from ..media.pixels import PixelPrep
from ..media.image_prep import is_half, precision, unit_range

RESIZE = 256
IMAGE_SIZE = 224
HEAD_DIM = 64
LN_EPS = 1e-6

# Keys of an official checkpoint that teal does not use (the decoder side, EMA statistics).
UNUSED_PREFIXES = (
    "decoder.",
    "decode_task_layer.",
    "quantize.cluster_size",
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
    "quantize.embedding.initted",
)
DROPPED_PREFIXES = ("loss", "teacher", "scaling")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.fused = False  # set for half precision: F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:  # the original's order of operations, so fp32 results agree bit for bit
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool, layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden)
        if layer_scale:
            self.gamma_1 = nn.Parameter(torch.ones(dim))
            self.gamma_2 = nn.Parameter(torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTEncoder(nn.Module):
    """The VQ-KD encoder: patch tokens out, after ``fc_norm`` (mean-pooling variant) or ``norm``."""

    def __init__(self, *, patch: int, grid: int, dim: int, depth: int, heads: int, hidden: int,
                 in_chans: int = 3, qkv_bias: bool = True, layer_scale: bool = False, mean_pooling: bool = True):
        super().__init__()
        self.patch, self.grid = patch, grid
        self.patch_embed = PatchEmbed(patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, hidden, qkv_bias, layer_scale) for _ in range(depth)])
        if mean_pooling:
            self.fc_norm = nn.LayerNorm(dim, eps=LN_EPS)
        else:
            self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        if hasattr(self, "fc_norm"):
            return self.fc_norm(x[:, 1:, :])
        return self.norm(x)[:, 1:]


class Codebook(nn.Module):
    """``quantize.embedding.weight``: ``[n_embed, 32]``, l2-normalised rows."""

    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_embed, dim))


class Quantizer(nn.Module):
    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.embedding = Codebook(n_embed, dim)

    def indices(self, features: torch.Tensor, chunk_rows: int = 8192) -> torch.Tensor:
        """``[B, N, d]`` fp32 task-layer outputs to ``[B, N]`` ids (NormEMAVectorQuantizer's lookup)."""
        b, n, d = features.shape
        z = F.normalize(features, p=2, dim=-1).reshape(-1, d)
        weight = self.embedding.weight
        weight_sq = weight.pow(2).sum(dim=1)
        out = []
        for rows in z.split(chunk_rows):
            dist = rows.pow(2).sum(dim=1, keepdim=True) + weight_sq - 2 * torch.einsum("bd,nd->bn", rows, weight)
            out.append(torch.argmin(dist, dim=1))
        return torch.cat(out).view(b, n)


class VQKD(nn.Module):
    """The tokenizer half of BEiT-v2's ``VQKD``."""

    def __init__(self, encoder: ViTEncoder, n_embed: int, code_dim: int):
        super().__init__()
        dim = encoder.pos_embed.shape[-1]
        self.encoder = encoder
        self.encode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, code_dim))
        self.quantize = Quantizer(n_embed, code_dim)


# ---------------------------------------------------------------- checkpoint


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensor refs of an official VQ-KD ``.pth`` (weights under ``model``; loss/teacher/scaling dropped)."""
    from ..weights import safe_pickle
    from ..weights.reader import read_torch

    root = read_torch(path)
    if not isinstance(root, dict):
        raise CodecError(f"{path}: not a BEiT-v2 VQ-KD checkpoint (expected a dict with 'model')")
    weights = root.get("model", root.get("state_dict", root))
    if not isinstance(weights, dict):
        raise CodecError(f"{path}: 'model' is not a state dict")
    refs = dict(safe_pickle.iter_tensors(weights))
    return {k: v for k, v in refs.items() if not k.startswith(DROPPED_PREFIXES)}


def infer_architecture(shapes: dict[str, tuple], path: Any, num_heads: int | None = None) -> dict:
    """Encoder and codebook sizes from an official state dict's shapes."""
    try:
        dim, in_chans, patch = shapes["encoder.patch_embed.proj.weight"][:3]
        tokens = shapes["encoder.pos_embed"][1] - 1
        depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
        hidden = shapes["encoder.blocks.0.mlp.fc1.weight"][0]
        n_embed, code_dim = shapes["quantize.embedding.weight"]
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise CodecError(f"{path}: not a BEiT-v2 VQ-KD checkpoint (cannot find {exc})") from None
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CodecError(f"{path}: {tokens} position embeddings do not form a square grid")
    if any(".relative_position_bias_table" in k or k.startswith("encoder.rel_pos_bias") for k in shapes):
        raise CodecError(f"{path}: relative position biases are not supported (VQ-KD uses absolute position embeddings)")
    heads = num_heads or max(1, dim // HEAD_DIM)
    if dim % heads:
        raise CodecError(f"{path}: width {dim} is not divisible by {heads} heads (pass num_heads)")
    return {
        "encoder": {
            "patch": patch, "grid": grid, "dim": dim, "depth": depth, "heads": heads, "hidden": hidden, "in_chans": in_chans,
            "qkv_bias": "encoder.blocks.0.attn.q_bias" in shapes,
            "layer_scale": "encoder.blocks.0.gamma_1" in shapes,
            "mean_pooling": "encoder.fc_norm.weight" in shapes,
        },
        "n_embed": n_embed,
        "code_dim": code_dim,
    }


def build_model(checkpoint: str | Path, num_heads: int | None = None) -> VQKD:
    from ..weights.reader import load_into

    refs = read_state_dict(checkpoint)
    arch = infer_architecture({k: tuple(v.shape) for k, v in refs.items()}, checkpoint, num_heads)
    with torch.device("meta"):
        model = VQKD(ViTEncoder(**arch["encoder"]), arch["n_embed"], arch["code_dim"])
    return load_into(model, refs, str(checkpoint), ignore=UNUSED_PREFIXES)


# ---------------------------------------------------------------- codec


class Beit2Codec(ImageCodec):
    """BEiT-v2 VQ-KD as a teal image codec (see the module docstring). Understanding only."""

    has_decoder = False

    def __init__(self, model: VQKD, name: str = "beit2", dtype: torch.dtype | None = None):
        self.model = model
        self.name = name
        self.vocab_size = model.quantize.embedding.weight.shape[0]
        self.downsample = model.encoder.patch
        self.image_size = model.encoder.patch * model.encoder.grid
        self.dtype = dtype
        self.device = torch.device("cpu")

    @property
    def codebook(self) -> torch.Tensor:
        """The l2-normalised ``[8192, 32]`` codebook (``quantize.embedding.weight``)."""
        return self.model.quantize.embedding.weight.detach().float().cpu()

    def pixel_prep(self, image_size: int | None = None) -> PixelPrep:
        from PIL import Image

        if image_size and image_size != self.image_size:
            raise UsageError(
                f"codec '{self.name}' works at {self.image_size} px only (its position embeddings are fixed); drop --image-size"
            )
        resize = round(self.image_size * RESIZE / IMAGE_SIZE)
        return PixelPrep("shorter", resize, Image.BICUBIC, crop=self.image_size)

    def pixel_table(self) -> np.ndarray:
        # ToTensor, then VQKD.pre_process (a [0, 1] batch is scaled by 255, then / 127.5 - 1):
        # the same float32 operations as the torch original.
        return unit_range(np.arange(256, dtype=np.uint8)) * 255.0 / 127.5 - 1.0

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` preprocessed pixels to ``[B, 14, 14]`` int64 ids, on the codec's device."""
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (size, size):
            raise UsageError(f"codec '{self.name}': expected pixels [B, 3, {size}, {size}], got {list(pixels.shape)}")
        x = pixels.to(self.device, torch.float32, non_blocking=True)
        half = is_half(self.device, self.dtype)
        for block in self.model.encoder.blocks:
            block.attn.fused = half
        with precision(self.device, self.dtype):
            features = self.model.encoder(x)
        with precision(self.device, None):  # the original runs the task layer with autocast off
            z = self.model.encode_task_layer(features.float())
            ids = self.model.quantize.indices(z)
        grid = self.model.encoder.grid
        return ids.view(-1, grid, grid)

    def no_decoder_error(self) -> CodecError:
        return CodecError(
            f"codec '{self.name}' (BEiT-v2 VQ-KD) has no pixel decoder: its tokens are for understanding only; "
            "tokenize with vqgan-f16-16384 (or dalle) to get images back"
        )

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise self.no_decoder_error()


def load(
    spec: Any = None,
    *,
    checkpoint_file: Any = None,
    checkpoint: str | Path | None = None,
    num_heads: int | None = None,
    dtype: torch.dtype | None = None,
    progress: Any = None,
    **_: Any,
) -> Beit2Codec:
    """Registry loader: a local ``checkpoint`` (``.pth``), else the spec's official file (fetched, prefix-checked)."""
    name = getattr(spec, "name", None) or "beit2"
    if checkpoint is None:
        if checkpoint_file is None:
            raise UsageError(f"codec '{name}' needs --checkpoint PATH (a vqkd_encoder_*.pth)")
        from ..weights.hub import fetch

        checkpoint = fetch(checkpoint_file, progress=progress)  # checks the sha256 prefix in the file name
    elif not Path(checkpoint).is_file():
        raise UsageError(f"--checkpoint {checkpoint}: no such file")
    codec = Beit2Codec(build_model(checkpoint, num_heads), name=name, dtype=dtype)
    codec.weights_files = (str(checkpoint),)
    return codec
