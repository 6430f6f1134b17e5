"""Frozen Whisper encoder features: the front half of ``whisper-*-l{N}-k{K}`` codecs.

The encoder is implemented here (state-dict compatible with the ``encoder.*`` entries of
openai-whisper's ``.pt`` files) and loads three checkpoint formats:

- openai-whisper ``.pt`` (``{"dims", "model_state_dict"}``), by official name
  (``whisper-small`` -> downloaded from openai's URL, sha256-checked) or by path;
- Hugging Face (``openai/whisper-small`` or a local folder with ``config.json`` and
  safetensors): ``WhisperEncoder`` keys are renamed to openai's (the two are the same
  weights under other names, which is how Hugging Face converted them);
- CTranslate2 / faster-whisper folders (``model.bin`` + ``config.json``): read by
  :mod:`teal_cli.features.ct2`, dequantized to fp32 and the fused QKV split again.

Layer convention: ``layer=N`` is the output of residual block N counted from 1 (the
same tensor as Hugging Face's ``hidden_states[N]`` for N below the depth); ``layer=0`` is
the block input (convolutions + positional embedding); ``layer="final"`` is the output
after ``ln_post`` (what ``model.encoder(mel)`` returns, and Hugging Face's last hidden state).
Blocks after N are never run.

Audio: Whisper's log-mel of the whole clip with 30 s of zeros appended (as
``whisper.transcribe`` does), cut into consecutive 3000-frame windows; every window goes
through the encoder at its full 1500 positions (the encoder is only exact that way), and
each window's output is trimmed to the frames that cover real audio, ``ceil(samples / 320)``
at 50 Hz. Windows of many clips are batched together.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..media import logmel as audio
from ..errors import CodecError, UsageError
from .base import FeatureExtractor, check_layer

if TYPE_CHECKING:
    import torch

_URL = "https://openaipublic.azureedge.net/main/whisper/models/{sha}/{file}"
# Official openai-whisper checkpoints: name -> (sha256, file). The digest is also the URL's folder.
OPENAI_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "tiny.en": ("d3dd57d32accea0b295c96e26691aa14d8822fac7d9d27d5dc00b4ca2826dd03", "tiny.en.pt"),
    "tiny": ("65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9", "tiny.pt"),
    "base.en": ("25a8566e1d0c1e2231d1c762132cd20e0f96a85d16145c3a00adf5d1ac670ead", "base.en.pt"),
    "base": ("ed3a0b6b1c0edf879ad9b11b1af5a0e6ab5db9205f891f668f8b0e6c6326e34e", "base.pt"),
    "small.en": ("f953ad0fd29cacd07d5a9eda5624af0f6bcf2258be67c92b79389873d91e0872", "small.en.pt"),
    "small": ("9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794", "small.pt"),
    "medium.en": ("d7440d1dc186f76616474e0ff0b3b6b879abc9d1a4926b7adfa41db2d497ab4f", "medium.en.pt"),
    "medium": ("345ae4da62f9b3d59415adc60127b97c714f32e89e936602e85993674d08dcb1", "medium.pt"),
    "large-v1": ("e4b87e7e0bf463eb8e6956e646f1e277e901512310def2c24bf0e11bd3c28e9a", "large-v1.pt"),
    "large-v2": ("81f7c96c852ee8fc832187b0132e569d6c3065a3252ed18e56effd0b6a73e524", "large-v2.pt"),
    "large-v3": ("e5b1a55b89c1367dacf97e3e19bfd829a01529dbfdeefa8caeb59b3f1b81dadb", "large-v3.pt"),
    "large-v3-turbo": ("aff26ae408abcba5fbf8813c21e62b0941638c5f6eebfb145be0c9839262a19a", "large-v3-turbo.pt"),
}
ALIASES = {"large": "large-v3", "turbo": "large-v3-turbo"}
# encoder (layers, width) -> size name, to name checkpoints that do not say what they are
_SIZES = {(4, 384): "tiny", (6, 512): "base", (12, 768): "small", (24, 1024): "medium", (32, 1280): "large"}
ENCODER_FRAME_RATE = 50.0
SAMPLES_PER_FRAME = audio.HOP_LENGTH * 2  # 320: conv2 has stride 2


@dataclass(frozen=True)
class EncoderDims:
    """The encoder half of openai-whisper's ``ModelDimensions``."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int


def _encoder_classes():
    """The encoder modules, built on first use so that importing this file needs no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):  # fp32 statistics whatever the activations' dtype, as openai does
            return super().forward(x.float()).type(x.dtype)

    class Linear(nn.Linear):
        def forward(self, x):
            return F.linear(x, *_weights_as(self, x.dtype))

    class Conv1d(nn.Conv1d):
        def forward(self, x):
            return self._conv_forward(x, *_weights_as(self, x.dtype))

    class Attention(nn.Module):
        def __init__(self, n_state: int, n_head: int):
            super().__init__()
            self.n_head = n_head
            self.query = Linear(n_state, n_state)
            self.key = Linear(n_state, n_state, bias=False)
            self.value = Linear(n_state, n_state)
            self.out = Linear(n_state, n_state)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (p(x).view(b, t, self.n_head, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
            y = F.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(b, t, d))

    class Block(nn.Module):
        def __init__(self, n_state: int, n_head: int):
            super().__init__()
            self.attn = Attention(n_state, n_head)
            self.attn_ln = LayerNorm(n_state)
            self.mlp = nn.Sequential(Linear(n_state, 4 * n_state), nn.GELU(), Linear(4 * n_state, n_state))
            self.mlp_ln = LayerNorm(n_state)

        def forward(self, x):
            x = x + self.attn(self.attn_ln(x))
            return x + self.mlp(self.mlp_ln(x))

    class Encoder(nn.Module):
        """openai-whisper's ``AudioEncoder``, able to stop after any block."""

        def __init__(self, dims: EncoderDims):
            super().__init__()
            self.dims = dims
            self.conv1 = Conv1d(dims.n_mels, dims.n_audio_state, kernel_size=3, padding=1)
            self.conv2 = Conv1d(dims.n_audio_state, dims.n_audio_state, kernel_size=3, stride=2, padding=1)
            self.register_buffer("positional_embedding", torch.empty(dims.n_audio_ctx, dims.n_audio_state))
            self.blocks = nn.ModuleList(Block(dims.n_audio_state, dims.n_audio_head) for _ in range(dims.n_audio_layer))
            self.ln_post = LayerNorm(dims.n_audio_state)

        def forward(self, mel, layer: int | None = None):
            """``[B, n_mels, 2 * n_audio_ctx]`` -> ``[B, n_audio_ctx, n_state]`` at ``layer``
            (None: after ``ln_post``)."""
            x = F.gelu(self.conv1(mel))
            x = F.gelu(self.conv2(x)).permute(0, 2, 1)
            if x.shape[1:] != self.positional_embedding.shape:
                raise CodecError(f"Whisper encoder expects {2 * self.dims.n_audio_ctx} mel frames, got {mel.shape[-1]}")
            x = (x + self.positional_embedding).to(x.dtype)
            depth = len(self.blocks) if layer is None else layer
            for block in self.blocks[:depth]:
                x = block(x)
            return self.ln_post(x) if layer is None else x

    return Encoder


def build_encoder(dims: EncoderDims) -> "torch.nn.Module":
    return _encoder_classes()(dims)


def _weights_as(module: "torch.nn.Module", dtype: "torch.dtype") -> tuple:
    """A Linear's or Conv1d's ``(weight, bias)`` as ``dtype``, as openai-whisper casts them on
    every call: the copies :func:`set_compute_dtype` made when they are of ``dtype`` and on
    the weights' device, else a cast now."""
    copies = module.__dict__.get("_compute")
    if copies is not None and copies[0].dtype == dtype and copies[0].device == module.weight.device:
        return copies
    return module.weight.to(dtype), None if module.bias is None else module.bias.to(dtype)


def set_compute_dtype(encoder: "torch.nn.Module", dtype: "torch.dtype") -> None:
    """Keep ``dtype`` copies of the encoder's Linear and Conv1d weights next to the float32
    ones, so that a half-precision forward casts no weights (the same values: a cast is
    exact to repeat). LayerNorms and the positional embedding stay float32, as openai-whisper
    computes them. Each half forward of Whisper-small otherwise launches 125 weight casts
    that read and write 0.5 GB; the copies take half the weights' float32 memory again.
    Call it again after moving the encoder (a float32 ``dtype`` drops the copies)."""
    import torch

    for module in encoder.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
            module.__dict__["_compute"] = None if dtype == torch.float32 else (
                module.weight.to(dtype), None if module.bias is None else module.bias.to(dtype))


# ---------------------------------------------------------------- checkpoint formats


def _split_qkv(prefix: str, get, state: dict, i: int, where: Any = "model.bin") -> None:
    """Un-fuse CTranslate2's ``self_attention/linear_0`` ([3d, d]) into query, key, value."""
    weight = get(f"{prefix}/self_attention/linear_0/weight")
    bias = get(f"{prefix}/self_attention/linear_0/bias")
    if weight.dim() != 2 or weight.shape[0] % 3 or bias.shape != weight.shape[:1]:
        raise CodecError(f"{where}: {prefix}/self_attention/linear_0: fused QKV of shape {list(weight.shape)} "
                         f"(bias {list(bias.shape)}) does not split in three")
    q, k, v = weight.chunk(3, dim=0)
    qb, _, vb = bias.chunk(3, dim=0)  # key has no bias; the converter fused zeros in its place
    state.update({f"blocks.{i}.attn.query.weight": q, f"blocks.{i}.attn.query.bias": qb,
                  f"blocks.{i}.attn.key.weight": k,
                  f"blocks.{i}.attn.value.weight": v, f"blocks.{i}.attn.value.bias": vb})


def state_from_ct2(folder: Path) -> tuple[EncoderDims, dict[str, "torch.Tensor"]]:
    """Encoder dims and an openai-named fp32 state dict from a CTranslate2 Whisper folder."""
    from .ct2 import dequantize, read_model_bin

    variables, header = read_model_bin(folder / "model.bin")
    if header["spec"] and header["spec"] != "WhisperSpec":
        raise CodecError(f"{folder}: CTranslate2 model is a {header['spec']}, not a Whisper model")

    where = folder / "model.bin"

    def get(name: str):
        if name not in variables:
            raise CodecError(f"{where}: variable {name} missing (not a Whisper model, or a damaged file?)")
        try:
            return dequantize(variables, name)
        except CodecError as exc:
            raise CodecError(f"{where}: {exc}") from None

    n_layer = sum(1 for k in variables if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    pos = get("encoder/position_encodings/encodings")
    conv1 = get("encoder/conv1/weight")
    heads = variables.get("encoder/num_heads")
    if heads is None or heads.numel() != 1 or pos.dim() != 2 or conv1.dim() != 3 or not n_layer:
        raise CodecError(f"{where}: not a CTranslate2 Whisper encoder (num_heads, position encodings, conv1 or "
                         "layers missing or misshapen)")
    dims = _dims({"n_mels": conv1.shape[1], "n_audio_ctx": pos.shape[0], "n_audio_state": pos.shape[1],
                  "n_audio_head": int(heads.reshape(())), "n_audio_layer": n_layer},
                 ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer"), where)
    state = {"conv1.weight": conv1, "conv1.bias": get("encoder/conv1/bias"),
             "conv2.weight": get("encoder/conv2/weight"), "conv2.bias": get("encoder/conv2/bias"),
             "positional_embedding": pos,
             "ln_post.weight": get("encoder/layer_norm/gamma"), "ln_post.bias": get("encoder/layer_norm/beta")}
    for i in range(n_layer):
        p = f"encoder/layer_{i}"
        _split_qkv(p, get, state, i, where)
        state.update({
            f"blocks.{i}.attn.out.weight": get(f"{p}/self_attention/linear_1/weight"),
            f"blocks.{i}.attn.out.bias": get(f"{p}/self_attention/linear_1/bias"),
            f"blocks.{i}.attn_ln.weight": get(f"{p}/self_attention/layer_norm/gamma"),
            f"blocks.{i}.attn_ln.bias": get(f"{p}/self_attention/layer_norm/beta"),
            f"blocks.{i}.mlp.0.weight": get(f"{p}/ffn/linear_0/weight"),
            f"blocks.{i}.mlp.0.bias": get(f"{p}/ffn/linear_0/bias"),
            f"blocks.{i}.mlp.2.weight": get(f"{p}/ffn/linear_1/weight"),
            f"blocks.{i}.mlp.2.bias": get(f"{p}/ffn/linear_1/bias"),
            f"blocks.{i}.mlp_ln.weight": get(f"{p}/ffn/layer_norm/gamma"),
            f"blocks.{i}.mlp_ln.bias": get(f"{p}/ffn/layer_norm/beta"),
        })
    return dims, state


_HF_LAYER_RENAMES = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}


def _hf_to_openai(key: str) -> str | None:
    """``model.encoder.layers.3.fc1.weight`` -> ``blocks.3.mlp.0.weight``; None for non-encoder keys."""
    head, sep, rest = key.partition("encoder.")
    if not sep or head not in ("", "model."):
        return None
    if rest == "embed_positions.weight":
        return "positional_embedding"
    if rest.startswith("layer_norm."):
        return "ln_post." + rest[len("layer_norm."):]
    if rest.startswith("layers."):
        _, index, inner = rest.split(".", 2)
        module, _, param = inner.rpartition(".")
        return f"blocks.{index}.{_HF_LAYER_RENAMES.get(module, module)}.{param}"
    return rest  # conv1.*, conv2.*


def _dims(values: dict, keys: tuple[str, ...], where: Any) -> EncoderDims:
    """EncoderDims from five config entries (``keys`` in EncoderDims' order), each checked."""
    from ..weights.reader import config_value

    numbers = [config_value(values, key, int, where, positive=True) for key in keys]
    dims = EncoderDims(*numbers)
    if dims.n_audio_state % dims.n_audio_head:
        raise CodecError(f"{where}: width {dims.n_audio_state} is not divisible by {dims.n_audio_head} attention heads")
    return dims


def state_from_hf(folder: Path) -> tuple[EncoderDims, dict[str, "torch.Tensor"], list[Path]]:
    """Encoder dims and an openai-named state dict from a Hugging Face Whisper folder
    (``model.safetensors``, sharded safetensors with their index, or ``pytorch_model.bin``)."""
    from ..weights.reader import hf_weight_files, read_json, read_weight_files

    config_path = folder / "config.json"
    config = read_json(config_path, "Hugging Face config")
    if config.get("model_type") != "whisper":
        raise CodecError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'whisper'")
    dims = _dims(config, ("num_mel_bins", "max_source_positions", "d_model", "encoder_attention_heads", "encoder_layers"),
                 config_path)
    files = hf_weight_files(folder)
    tensors = read_weight_files(files, keep=lambda k: _hf_to_openai(k) is not None)
    state = {_hf_to_openai(k): v.float() for k, v in tensors.items()}
    return dims, state, files


def state_from_openai(path: Path) -> tuple[EncoderDims, dict[str, "torch.Tensor"]]:
    """Encoder dims and state dict from an openai-whisper ``.pt`` (read by
    :func:`teal_cli.weights.reader.read_torch`: tensors only, nothing in the file runs)."""
    from ..weights.reader import load_refs, read_torch, tensor_refs

    checkpoint = read_torch(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("dims"), dict) \
            or not isinstance(checkpoint.get("model_state_dict"), dict):
        raise CodecError(f"{path}: not an openai-whisper checkpoint (expected a dict with 'dims' and 'model_state_dict')")
    dims = _dims(checkpoint["dims"], ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer"),
                 f"{path}: dims")
    refs = tensor_refs(checkpoint["model_state_dict"])
    tensors = load_refs(refs, str(path), keep=lambda k: k.startswith("encoder."))
    return dims, {k[len("encoder."):]: v.float() for k, v in tensors.items()}


def _multi_sha256(files: list[Path]) -> str:
    """sha256 of one file; for sharded checkpoints, of the shards' digests joined."""
    from ..weights.digests import files_sha256

    return files_sha256(files)


def _size_name(dims: EncoderDims) -> str:
    return _SIZES.get((dims.n_audio_layer, dims.n_audio_state), f"d{dims.n_audio_state}x{dims.n_audio_layer}")


def _official(name: str) -> str | None:
    """``whisper-small`` / ``small`` / ``openai/whisper-small``? -> ``small``; None otherwise."""
    short = name.removeprefix("whisper-").removeprefix("whisper_")
    short = ALIASES.get(short, short)
    return short if short in OPENAI_CHECKPOINTS else None


def _locate(source: str, option: str = "--checkpoint") -> tuple[Path, str, list[Path]]:
    """``(absolute path, format, weight files)`` of a checkpoint path or Hugging Face repo id;
    nothing is read but the folder listing (and a weights index)."""
    from ..weights.reader import hf_weight_files

    path = Path(source).expanduser()
    if not path.exists():
        if "/" in source and not source.startswith((".", "/", "~")):
            path = _hf_snapshot(source)
        else:
            raise UsageError(f"{option} {source}: no such file or folder")
    path = path.resolve()
    if path.is_dir() and (path / "model.bin").exists():
        return path, "ctranslate2", [path / "model.bin"]
    if path.is_dir() and (path / "config.json").exists():
        return path, "huggingface", hf_weight_files(path)
    if path.is_file():
        return path, "openai", [path]
    if path.is_dir() and any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        raise CodecError(f"{path / 'config.json'}: not found: a Hugging Face folder needs its config beside the weights")
    raise CodecError(f"{path}: not an openai .pt file, a Hugging Face folder (config.json) or a CTranslate2 folder (model.bin)")


def _read(path: Path, fmt: str, files: list[Path], source: str, sha: str = "") -> dict[str, Any]:
    """Read a located checkpoint: ``{"model", "format", "path", "dims", "state", "sha256"}``."""
    from ..weights.digests import files_sha256

    if fmt == "ctranslate2":
        dims, state = state_from_ct2(path)
        model = _ct2_model_name(path, dims)
    elif fmt == "huggingface":
        dims, state, files = state_from_hf(path)
        model = "whisper-" + (_official(path.name) or _official(Path(source).name) or _size_name(dims))
    else:
        dims, state = state_from_openai(path)
        model = "whisper-" + (_official(path.stem) or _size_name(dims))
    return {"model": model, "format": fmt, "path": str(path), "dims": dims, "state": state,
            "sha256": sha or files_sha256(files)}


def resolve_checkpoint(name: str, checkpoint: str | None = None, progress=None) -> dict[str, Any]:
    """Find the weights for ``--features NAME [--checkpoint PATH]``.

    Returns ``{"model", "format", "path", "dims", "state", "sha256"}``; ``path`` is absolute
    (a codec directory records it, and must work from any folder). ``checkpoint`` may be an
    openai ``.pt``, a Hugging Face folder or repo id (``openai/whisper-small``), or a
    CTranslate2 folder; without it, ``name`` must be an official openai name.
    """
    from ..weights.hub import HubFile, fetch

    if checkpoint is None:
        short = _official(name)
        if short is None:
            known = ", ".join("whisper-" + n for n in [*OPENAI_CHECKPOINTS, *ALIASES])
            raise UsageError(f"--features {name}: unknown Whisper model; known: {known} (or pass --checkpoint PATH)")
        sha, file = OPENAI_CHECKPOINTS[short]
        path = fetch(HubFile(_URL.format(sha=sha, file=file), sha, "whisper"), progress=progress)
        dims, state = state_from_openai(path)
        return {"model": "whisper-" + short, "format": "openai", "path": str(path.resolve()), "dims": dims,
                "state": state, "sha256": sha}
    path, fmt, files = _locate(checkpoint)
    return _read(path, fmt, files, checkpoint)


def _ct2_model_name(folder: Path, dims: EncoderDims) -> str:
    size = _size_name(dims)
    vocab = folder / "vocabulary.txt"
    if vocab.is_file() and size in ("tiny", "base", "small", "medium"):
        with open(vocab, encoding="utf-8") as f:
            if sum(1 for _ in f) == 51864:  # the English-only vocabulary is one token shorter
                size += ".en"
    return "whisper-" + size


def _hf_snapshot(repo_id: str) -> Path:
    """Download (or find in the Hugging Face cache) the files a Whisper encoder needs."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, no hub client: one message
        raise CodecError(
            f"--checkpoint {repo_id}: cannot get it from the Hugging Face hub ({type(exc).__name__}); "
            "download the repository and pass its local folder"
        ) from None


# ---------------------------------------------------------------- the extractor


class WhisperFeatures(FeatureExtractor):
    """Hidden states of a frozen Whisper encoder, 50 frames per second.

    Args:
        model: display name (``whisper-small``), recorded in the codec.
        dims, state: encoder shape and openai-named weights (see :func:`resolve_checkpoint`).
        layer: block output to use (1..depth), ``0`` for the block input or ``"final"``.
        sha256: digest of the weights file loaded, recorded in the codec.
        batch_size: 30 s windows per encoder forward.
    """

    kind = "whisper"
    modality = "audio"
    sample_rate = audio.SAMPLE_RATE
    frame_rate = ENCODER_FRAME_RATE

    def __init__(self, model: str, dims: EncoderDims, state: dict, layer: int | str | None = None, *,
                 sha256: str = "", checkpoint: str = "", fmt: str = "", dtype: str | None = None,
                 device: str | None = None, batch_size: int | None = None):
        import torch

        from ..runtime.device import resolve_device

        self.model_name = model
        self.dims = dims
        self.layer = _check_layer(layer, dims.n_audio_layer, model)
        self.sha256 = sha256
        self.checkpoint = checkpoint
        self.format = fmt
        self.dim = dims.n_audio_state
        self.n_mels = dims.n_mels
        from ..weights.reader import check_shapes

        with torch.device("meta"):  # shapes first: a config that disagrees costs no memory
            encoder = build_encoder(dims)
        check_shapes(encoder.state_dict(), state, checkpoint or model,
                     hint="the checkpoint's config/dims disagree with its tensors (a damaged or mixed-up file?)")
        self.encoder = encoder.to_empty(device="cpu")
        self.encoder.load_state_dict(state, strict=True)
        self.encoder.eval().requires_grad_(False)
        self.dtype_spec = dtype
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.to(resolve_device(device or "cpu"))

    # -- construction

    @classmethod
    def from_name(cls, name: str, layer: int | str | None = None, checkpoint: str | None = None,
                  dtype: str | None = None, device: str | None = None, batch_size: int | None = None,
                  **_: Any) -> "WhisperFeatures":
        found = resolve_checkpoint(name, checkpoint)
        return cls(found["model"], found["dims"], found["state"], layer, sha256=found["sha256"],
                   checkpoint=found["path"], fmt=found["format"], dtype=dtype, device=device, batch_size=batch_size)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, checkpoint: str | None = None, codec_dir: Path | None = None,
                    **overrides: Any) -> "WhisperFeatures":
        """Rebuild from a codec's ``features`` block, refusing weights whose sha256 differs.

        The weights: ``checkpoint`` when given (the same weights elsewhere); else the recorded
        checkpoint (:func:`~teal_cli.features.base.find_recorded`: absolute, or relative to
        ``codec_dir``) when it exists with the recorded sha256; else openai's download when
        the recorded sha256 is that official file's; else a CodecError naming the recorded
        path and sha256."""
        from .base import find_recorded

        model = config.get("model")
        if not isinstance(model, str) or not model:
            raise CodecError(f"{codec_dir or 'codec'}: features block has no Whisper 'model' name")
        where = f"codec {codec_dir}" if codec_dir is not None else f"whisper features {model}"
        sha = str(config.get("sha256") or "")
        kwargs = {k: v for k, v in overrides.items() if k in ("dtype", "device", "batch_size")}
        if checkpoint is not None:
            from ..weights.digests import files_sha256

            path, fmt, files = _locate(checkpoint)
            digest = files_sha256(files)
            if sha and digest != sha:
                raise CodecError(f"--checkpoint {checkpoint}: its weights have sha256 {digest[:16]}..., but "
                                 f"{where} was fitted on {config.get('checkpoint') or 'weights'} with sha256 {sha}")
            found = _read(path, fmt, files, checkpoint, sha=digest)
        else:
            short = _official(model)
            official_sha = OPENAI_CHECKPOINTS[short][0] if short else ""
            use_official = bool(short) and (sha == official_sha or (not sha and config.get("format", "openai") == "openai"))
            located = find_recorded(config, codec_dir, where, "Whisper",
                                    (lambda: None) if use_official else None, _locate)
            found = resolve_checkpoint(model) if located is None else _read(*located[:3], str(located[0]), sha=located[3])
        found["model"] = model  # the same weights, whatever the folder is called now
        extractor = cls(model, found["dims"], found["state"], config.get("layer"), sha256=found["sha256"],
                        checkpoint=found["path"], fmt=found["format"], **kwargs)
        extractor.check_compatible(config, where)
        return extractor

    def config(self) -> dict[str, Any]:
        return {"kind": "whisper", "model": self.model_name, "checkpoint": self.checkpoint, "format": self.format,
                "sha256": self.sha256, "layer": self.layer, "dim": self.dim, "n_mels": self.n_mels,
                "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                "normalisation": "whisper log-mel ((log10 clamp 1e-10, floor max-8) + 4) / 4",
                "dims": asdict(self.dims)}

    def check_compatible(self, stored: dict[str, Any], where: str) -> None:
        """Refuse another model, layer, mel size or weights; the checkpoint's location may change."""
        mine = self.config()
        for key in ("kind", "model", "layer", "n_mels", "sample_rate", "dim", "sha256"):
            if key in stored and stored[key] != mine[key]:
                raise CodecError(f"{where}: codec was fitted on whisper features with {key}={stored[key]!r}, "
                                 f"but the extractor given has {key}={mine[key]!r}"
                                 + (" (another checkpoint file)" if key == "sha256" else ""))

    def name_stem(self) -> str:
        layer = "final" if self.layer == "final" else f"l{self.layer}"
        return f"{self.model_name}-{layer}"

    def to(self, device) -> "WhisperFeatures":
        import torch

        self.device = torch.device(device)
        spec = self.dtype_spec or "auto"
        if spec == "auto":  # Whisper is trained and usually run in fp16 on GPUs
            self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        else:
            from ..runtime.device import resolve_dtype

            self.dtype = resolve_dtype(spec, self.device)
        self.encoder.to(self.device)
        set_compute_dtype(self.encoder, self.dtype)
        return self

    # -- extraction

    @property
    def min_samples(self) -> int:
        """320 samples, one encoder frame's hop. Whisper pads every clip with 30 s of zeros,
        so any clip gives ``ceil(samples / 320)`` frames; a frame with less than its own
        320 samples of audio would be mostly that padding, and is refused instead."""
        return SAMPLES_PER_FRAME

    def windows(self, wave: "torch.Tensor") -> tuple["torch.Tensor", list[int]]:
        """One clip's mel windows ``[W, n_mels, 3000]`` and the real encoder frames of each."""
        import torch

        from ..runtime.device import upload_flat

        wave = upload_flat([wave], self.device, torch.float32)[0]  # asynchronous (see _rows)
        n = wave.shape[-1]
        # Whisper pads 30 s of zeros; frames past one FFT of them are silent, so they are
        # filled in rather than computed (see log_mel's extend_to).
        mel = audio.log_mel(wave, self.n_mels, padding=audio.N_FFT, extend_to=(n + audio.N_SAMPLES) // audio.HOP_LENGTH)
        n_windows = max(1, math.ceil(n / audio.N_SAMPLES))
        mel = mel[:, : n_windows * audio.N_FRAMES]
        if mel.shape[-1] < n_windows * audio.N_FRAMES:  # only when n is not a multiple of 160 near the end
            mel = _pad_frames(mel, n_windows * audio.N_FRAMES)
        windows = mel.reshape(self.n_mels, n_windows, audio.N_FRAMES).permute(1, 0, 2)
        total = math.ceil(n / SAMPLES_PER_FRAME)
        per = audio.N_FRAMES // 2
        frames = [min(per, total - i * per) for i in range(n_windows)]
        return windows, frames

    def encode(self, mel: "torch.Tensor") -> "torch.Tensor":
        """``[B, n_mels, 3000]`` -> ``[B, 1500, dim]`` at the chosen layer (float32)."""
        return self._hidden(mel).float()

    def _hidden(self, mel: "torch.Tensor") -> "torch.Tensor":
        """:meth:`encode` in the compute dtype."""
        import torch

        layer = None if self.layer == "final" else self.layer
        with torch.inference_mode():
            return self.encoder(mel.to(self.device, self.dtype), layer=layer)

    def extract(self, waves: "list[torch.Tensor]") -> "list[torch.Tensor]":
        """Mono 16 kHz waveforms to ``[ceil(len / 320), dim]`` float32 tensors on the device.

        Clips of up to 30 s (one window each) get their log-mels computed together, on rows
        as long as the batch's longest clip + one FFT of zeros; the frames after that see
        zeros only and are filled with a silent frame's value (``log_mel(extend_to=...)``), so
        the frames and the per-clip floor are those of Whisper's 30 s of padding (up to float
        rounding), at a third of the front end's work for 10 s clips. Longer clips take :meth:`windows`.
        Windows of all clips share encoder batches.
        """
        import torch

        for wave in waves:
            if wave.dim() != 1:
                raise UsageError(f"whisper features take mono waveforms [samples], got shape {tuple(wave.shape)}")
        batch = self.batch_size or (16 if self.device.type == "cuda" else 4)
        outputs: list[list[torch.Tensor]] = [[] for _ in waves]
        pending: list[torch.Tensor] = []
        pieces: list[tuple[int, int]] = []  # (clip, real frames) per pending window

        def flush():
            if pending:
                hidden = self._hidden(pending[0] if len(pending) == 1 else torch.cat(pending))
                counts = [frames for _, frames in pieces]
                # The real frames of every window in one copy (then float32): views of it
                # are compact, and the padding's frames are never converted.
                real = torch.cat([h[:frames] for h, frames in zip(hidden, counts)]).float()
                for (clip, _), part in zip(pieces, real.split(counts)):
                    outputs[clip].append(part)
                pending.clear()
                pieces.clear()

        singles = [i for i, w in enumerate(waves) if w.shape[0] <= audio.N_SAMPLES]
        for start in range(0, len(singles), batch):
            group = singles[start : start + batch]
            longest = max(waves[clip].shape[0] for clip in group)
            rows = self._rows([waves[clip] for clip in group], longest + audio.N_FFT)
            pending.append(audio.log_mel(rows, self.n_mels, extend_to=audio.N_FRAMES)[..., : audio.N_FRAMES])
            pieces.extend((clip, math.ceil(waves[clip].shape[0] / SAMPLES_PER_FRAME)) for clip in group)
            flush()
        for clip, wave in enumerate(waves):
            if wave.shape[0] <= audio.N_SAMPLES:
                continue
            windows, frames = self.windows(wave)
            for window, count in zip(windows, frames):
                pending.append(window[None])
                pieces.append((clip, count))
                if len(pending) == batch:
                    flush()
        flush()
        return [parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.zeros(0, self.dim, device=self.device)
                for parts in outputs]


    def _rows(self, waves: "list[torch.Tensor]", width: int) -> "torch.Tensor":
        """Clips as zero-padded rows ``[len(waves), width]`` fp32 on the device, sent from the
        host in one asynchronous copy from pinned memory (:func:`teal_cli.runtime.device.upload_rows`).
        Copies from pageable memory made the host wait for the GPU to finish the previous
        batch, leaving it idle while this one was prepared (measured: 15 % of an H100's time
        with Whisper-small in fp16)."""
        import torch

        from ..runtime.device import upload_rows

        return upload_rows(waves, width, self.device, torch.float32)


def _pad_frames(mel: "torch.Tensor", frames: int) -> "torch.Tensor":
    import torch

    return torch.nn.functional.pad(mel, (0, frames - mel.shape[-1]))


def _check_layer(layer: int | str | None, depth: int, model: str) -> int | str:
    """``--layer`` for Whisper: blocks counted from 1; None picks depth - 1 (the paper's 11 of 12)."""
    return check_layer(layer, depth, model, default=max(depth - 1, 1), unit="encoder block",
                       final_note=" (after ln_post)")
