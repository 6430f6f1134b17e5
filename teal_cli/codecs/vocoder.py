"""Unit vocoders: discrete speech units -> waveform, from CodeHiFiGAN checkpoints.

k-means units over HuBERT or Whisper features carry no decoder of their own; a unit
vocoder turns them into sound. This module reads the official checkpoints of fairseq's
``CodeHiFiGANVocoder`` (the S2UT / textless vocoders, e.g. ``g_00500000`` + ``config.json``)
and of facebookresearch/speech-resynthesis, without fairseq:

- the checkpoint is a pickle ``{"generator": state_dict}``; it is read with teal's restricted
  unpickler (:mod:`teal_cli.weights.safe_pickle`), so nothing in the file is ever run;
- the state dict stores convolutions as legacy weight-norm pairs (``*.weight_g`` magnitude,
  ``*.weight_v`` direction); they are folded into plain weights on load, as
  ``remove_weight_norm`` does after fairseq loads them. The norm runs over every dimension
  but 0 of the stored weight, for ``Conv1d`` ``[out, in, k]`` and ``ConvTranspose1d``
  ``[in, out, k]`` alike (torch's ``weight_norm`` default);
- the JSON config gives the shapes (``upsample_rates``, ``resblock_kernel_sizes``,
  ``num_embeddings``...). Keys for training only are ignored.

Supported: unit embedding, HiFi-GAN generator with ResBlock ``"1"`` (fairseq) or ``"2"``
(speech-resynthesis option), the duration predictor (``dur_predictor_params``), and table
speaker / style embeddings (``multispkr``, ``multistyle``: one id for the whole clip).
Refused with a one-line error: F0 conditioning (``f0`` and its quantizers), speaker
embedders from external vectors (``embedder_params``) and VQ-VAE code encoders
(``code_vq_params``): teal has none of those inputs.

Durations: a record's ``durations`` (deduplicated units) are honoured first; without them
the duration predictor runs when asked (``dur_prediction``, from the caller or the config);
otherwise each unit is one frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import safe_pickle
from ..weights.reader import read_json, read_torch
from ..errors import CodecError, UsageError

if TYPE_CHECKING:
    from .base import Codec

CONFIG_NAME = "config.json"
SAMPLE_RATE = 16000  # every official unit vocoder; configs may say otherwise ("sampling_rate")
LRELU_SLOPE = 0.1  # inside the generator; its last activation uses torch's default 0.01
# Table rows when the config does not say (fairseq / speech-resynthesis / Expresso defaults).
DEFAULT_SPEAKERS = 200
DEFAULT_STYLES = 100

_REQUIRED = ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "resblock_kernel_sizes",
             "resblock_dilation_sizes", "num_embeddings", "embedding_dim")
# Inputs teal cannot provide: the key that enables each, and why.
_REFUSED = (
    ("f0", "F0-conditioned vocoders need a pitch track per clip, which token records do not carry"),
    ("f0_quantizer_path", "F0-conditioned vocoders need a pitch track per clip, which token records do not carry"),
    ("f0_quant_num_bin", "F0-conditioned vocoders need a pitch track per clip, which token records do not carry"),
    ("embedder_params", "its speakers are external embedding vectors, not ids"),
    ("code_vq_params", "it encodes raw features with a VQ-VAE, not k-means unit ids"),
    ("lambda_commit_code", "it encodes raw features with a VQ-VAE, not k-means unit ids"),
)


@dataclass(frozen=True)
class VocoderConfig:
    """The shape-defining part of a CodeHiFiGAN config."""

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_embeddings: int
    embedding_dim: int
    resblock: str = "1"
    num_speakers: int = 0  # 0: not a multi-speaker vocoder
    num_styles: int = 0
    dur_predictor: tuple[int, int] | None = None  # (hidden dim, kernel size)
    dur_prediction: bool = False
    sample_rate: int = SAMPLE_RATE

    @property
    def hop_length(self) -> int:
        """Samples per unit frame (320 for 50 Hz units at 16 kHz)."""
        return math.prod(self.upsample_rates)

    @property
    def in_dim(self) -> int:
        return self.embedding_dim * (1 + bool(self.num_speakers) + bool(self.num_styles))


def _ints(cfg: dict, key: str, where: str, *, length: int | None = None) -> tuple[int, ...]:
    value = cfg[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise CodecError(f"{where}: '{key}' must be a non-empty list of positive integers, got {value!r:.60}")
    if length is not None and len(value) != length:
        raise CodecError(f"{where}: '{key}' has {len(value)} entries, 'upsample_rates' has {length}")
    return tuple(value)


def _int(cfg: dict, key: str, where: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CodecError(f"{where}: '{key}' must be a positive integer, got {value!r:.60}")
    return value


def parse_config(cfg: Any, where: str) -> VocoderConfig:
    """Check a CodeHiFiGAN config dict (fairseq or speech-resynthesis) and keep what shapes the model."""
    if not isinstance(cfg, dict):
        raise CodecError(f"{where}: a vocoder config must be a JSON object")
    for key in _REQUIRED:
        if key not in cfg:
            raise CodecError(f"{where}: missing key '{key}' (not a CodeHiFiGAN vocoder config?)")
    for key, why in _REFUSED:
        if cfg.get(key):
            raise CodecError(f"{where}: '{key}' is set: teal cannot run this vocoder ({why})")
    rates = _ints(cfg, "upsample_rates", where)
    kernels = _ints(cfg, "upsample_kernel_sizes", where, length=len(rates))
    res_kernels = _ints(cfg, "resblock_kernel_sizes", where)
    resblock = str(cfg.get("resblock", "1"))
    if resblock not in ("1", "2"):
        raise CodecError(f"{where}: 'resblock' must be \"1\" or \"2\", got {cfg.get('resblock')!r}")
    dilations = cfg["resblock_dilation_sizes"]
    need = 3 if resblock == "1" else 2
    if (not isinstance(dilations, list) or len(dilations) != len(res_kernels)
            or not all(isinstance(d, list) and len(d) >= need and all(isinstance(v, int) and v > 0 for v in d)
                       for d in dilations)):
        raise CodecError(f"{where}: 'resblock_dilation_sizes' must hold one list of >= {need} positive integers "
                         f"per entry of 'resblock_kernel_sizes', got {dilations!r:.80}")
    channels = _int(cfg, "upsample_initial_channel", where)
    if channels % 2 ** len(rates):
        raise CodecError(f"{where}: 'upsample_initial_channel' {channels} does not halve {len(rates)} times")
    dim = _int(cfg, "embedding_dim", where)
    dur = None
    params = cfg.get("dur_predictor_params")
    if params:
        if not isinstance(params, dict) or "var_pred_hidden_dim" not in params or "var_pred_kernel_size" not in params:
            raise CodecError(f"{where}: 'dur_predictor_params' needs 'var_pred_hidden_dim' and 'var_pred_kernel_size'")
        if params.get("encoder_embed_dim", dim) != dim:
            raise CodecError(f"{where}: 'dur_predictor_params.encoder_embed_dim' {params['encoder_embed_dim']} "
                             f"differs from 'embedding_dim' {dim}")
        # The reference predictor pads its second convolution by 1 whatever the kernel:
        # only kernel 3 keeps one duration per unit.
        if params["var_pred_kernel_size"] != 3:
            raise CodecError(f"{where}: 'dur_predictor_params.var_pred_kernel_size' is {params['var_pred_kernel_size']}; "
                             "the CodeHiFiGAN duration predictor works only with 3")
        dur = (_int(params, "var_pred_hidden_dim", where), 3)
    dur_prediction = bool(cfg.get("dur_prediction", False))
    if dur_prediction and dur is None:
        raise CodecError(f"{where}: 'dur_prediction' is set but there are no 'dur_predictor_params'")
    config = VocoderConfig(
        upsample_rates=rates, upsample_kernel_sizes=kernels, upsample_initial_channel=channels,
        resblock_kernel_sizes=res_kernels, resblock_dilation_sizes=tuple(tuple(d) for d in dilations),
        num_embeddings=_int(cfg, "num_embeddings", where), embedding_dim=dim, resblock=resblock,
        num_speakers=_int(cfg, "num_speakers", where, DEFAULT_SPEAKERS) if cfg.get("multispkr") else 0,
        num_styles=_int(cfg, "num_styles", where, DEFAULT_STYLES) if cfg.get("multistyle") else 0,
        dur_predictor=dur, dur_prediction=dur_prediction,
        sample_rate=_int(cfg, "sampling_rate", where, SAMPLE_RATE),
    )
    if "model_in_dim" in cfg and cfg["model_in_dim"] != config.in_dim:
        raise CodecError(f"{where}: 'model_in_dim' is {cfg['model_in_dim']} but the unit embedding"
                         f"{' + speaker' if config.num_speakers else ''}{' + style' if config.num_styles else ''} "
                         f"gives {config.in_dim}")
    return config


# ---------------------------------------------------------------- the network


def _same_padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class _ResBlock(nn.Module):
    """HiFi-GAN residual block: ``"1"`` pairs a dilated and a plain conv per step, ``"2"`` one dilated conv."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...], kind: str):
        super().__init__()

        def conv(d: int) -> nn.Conv1d:
            return nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same_padding(kernel, d))

        self.kind = kind
        if kind == "1":
            self.convs1 = nn.ModuleList(conv(d) for d in dilations[:3])
            self.convs2 = nn.ModuleList(conv(1) for _ in dilations[:3])
        else:
            self.convs = nn.ModuleList(conv(d) for d in dilations[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "1":
            for c1, c2 in zip(self.convs1, self.convs2):
                x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        else:
            for c in self.convs:
                x = x + c(F.leaky_relu(x, LRELU_SLOPE))
        return x


class _DurationPredictor(nn.Module):
    """log(1 + frames) per unit, from the unit embeddings (two conv + layer-norm blocks)."""

    def __init__(self, dim: int, hidden: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T]
        x = self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2))
        x = self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(x).squeeze(2)


class CodeHiFiGAN(nn.Module):
    """The CodeGenerator, state-dict compatible with fairseq / speech-resynthesis (weight norm folded)."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.cfg = cfg
        self.dict = nn.Embedding(cfg.num_embeddings, cfg.embedding_dim)
        if cfg.num_speakers:
            self.spkr = nn.Embedding(cfg.num_speakers, cfg.embedding_dim)
        if cfg.num_styles:
            self.style = nn.Embedding(cfg.num_styles, cfg.embedding_dim)
        self.dur_predictor = _DurationPredictor(cfg.embedding_dim, *cfg.dur_predictor) if cfg.dur_predictor else None
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.in_dim, ch, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            _ResBlock(ch // 2 ** (i + 1), k, d, cfg.resblock)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        self.conv_post = nn.Conv1d(ch // 2 ** len(self.ups), 1, 7, padding=3)

    def predict_durations(self, units: torch.Tensor) -> torch.Tensor:
        """Frames per unit (>= 1) for a 1-d unit sequence."""
        log_dur = self.dur_predictor(self.dict(units)[None])[0]
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    def forward(self, units: torch.Tensor, speaker: int | None = None, style: int | None = None) -> torch.Tensor:
        """``[T]`` unit ids, one per frame -> ``[T * hop]`` waveform in [-1, 1]."""
        x = self.dict(units).T[None]  # [1, C, T]
        # Speaker and style are one vector per clip, repeated on every frame.
        for table, index in ((getattr(self, "spkr", None), speaker), (getattr(self, "style", None), style)):
            if table is not None:
                x = torch.cat([x, table.weight[index][None, :, None].expand(-1, -1, x.shape[-1])], dim=1)
        x = self.conv_pre(x)
        n = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum(block(x) for block in self.resblocks[i * n:(i + 1) * n]) / n
        return torch.tanh(self.conv_post(F.leaky_relu(x)))[0, 0]


# ---------------------------------------------------------------- reading checkpoints


@dataclass
class _FoldedWeight:
    """A weight-norm pair read as one plain weight (``g * v / ||v||``), lazily like a TensorRef."""

    g: safe_pickle.TensorRef
    v: safe_pickle.TensorRef

    @property
    def shape(self) -> tuple:
        return self.v.shape

    def load(self, where: str = "checkpoint") -> torch.Tensor:
        g, v = self.g.load(where).float(), self.v.load(where).float()
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(g.shape)
        return v * (g / norm)


# Legacy torch.nn.utils.weight_norm names, then the parametrization names of newer torch.
_NORM_PAIRS = ((".weight_g", ".weight_v"), (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def fold_weight_norm(state: dict[str, Any], where: str) -> dict[str, Any]:
    """Replace each (magnitude, direction) pair by the plain ``.weight`` it stands for."""
    out: dict[str, Any] = {}
    for key, ref in state.items():
        if not isinstance(ref, safe_pickle.TensorRef):
            raise CodecError(f"{where}: generator entry '{key}' is not a tensor")
        for g_suffix, v_suffix in _NORM_PAIRS:
            if key.endswith(v_suffix):
                break
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                v = state.get(base + v_suffix)
                if not isinstance(v, safe_pickle.TensorRef):
                    raise CodecError(f"{where}: '{key}' has no matching '{base + v_suffix}'")
                expected = (v.shape[0],) + (1,) * (len(v.shape) - 1)
                if tuple(ref.shape) != expected:
                    raise CodecError(f"{where}: '{key}' has shape {list(ref.shape)}, expected {list(expected)} "
                                     f"for the weight norm of '{base + v_suffix}' {list(v.shape)}")
                out[base + ".weight"] = _FoldedWeight(ref, v)
                break
        else:
            out[key] = ref
    for key in state:
        for g_suffix, v_suffix in _NORM_PAIRS:
            if key.endswith(v_suffix) and key[: -len(v_suffix)] + g_suffix not in state:
                raise CodecError(f"{where}: '{key}' has no matching '{key[: -len(v_suffix)] + g_suffix}'")
    return out


class UnitVocoder:
    """A loaded unit vocoder. :meth:`decode` turns unit ids into a waveform at :attr:`sample_rate`.

    ``speaker`` / ``style`` are the ids used for multi-speaker / multi-style vocoders;
    ``dur_prediction`` says whether segments without durations get predicted ones.
    """

    def __init__(self, model: CodeHiFiGAN, path: str, *, speaker: int | None = None, style: int | None = None,
                 dur_prediction: bool | None = None):
        self.model = model.eval()
        self.config = model.cfg
        self.path = path
        self.sample_rate = model.cfg.sample_rate
        self.hop_length = model.cfg.hop_length
        self.num_embeddings = model.cfg.num_embeddings
        self.speaker = self._check_id(speaker, model.cfg.num_speakers, "speaker", "--speaker")
        self.style = self._check_id(style, model.cfg.num_styles, "style", "--style")
        if dur_prediction and model.dur_predictor is None:
            raise UsageError(f"vocoder {path} has no duration predictor (no 'dur_predictor_params' in its config)")
        self.dur_prediction = model.cfg.dur_prediction if dur_prediction is None else dur_prediction

    def _check_id(self, value: int | None, count: int, what: str, option: str) -> int | None:
        if count and value is None:
            raise UsageError(f"vocoder {self.path} is multi-{what} ({count} {what}s): choose one with {option} N")
        if not count and value is not None:
            raise UsageError(f"{option} {value}: vocoder {self.path} has no {what} embedding")
        if value is not None and not 0 <= value < count:
            raise UsageError(f"{option} {value} is out of range: vocoder {self.path} has {what}s 0..{count - 1}")
        return value

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def to(self, device: torch.device | str) -> UnitVocoder:
        self.model.to(device)
        return self

    def check_codec(self, codec: Codec) -> None:
        """Refuse a codec whose units this vocoder was not trained on (k or frame rate differ)."""
        if codec.vocab_size != self.num_embeddings:
            raise CodecError(f"vocoder {self.path} takes {self.num_embeddings} units (num_embeddings) but codec "
                             f"'{codec.name}' has k={codec.vocab_size}: use the vocoder trained on these units")
        rate = getattr(codec, "frame_rate", None)
        if rate and abs(rate - self.frame_rate) > 1e-6:
            raise CodecError(f"vocoder {self.path} makes {self.frame_rate:g} frames/s "
                             f"({self.sample_rate} Hz / hop {self.hop_length}) but codec '{codec.name}' has {rate:g}")

    def predict_durations(self, ids: torch.Tensor) -> torch.Tensor:
        """Frames per unit from the vocoder's duration predictor."""
        if self.model.dur_predictor is None:
            raise UsageError(f"vocoder {self.path} has no duration predictor")
        device = self.model.dict.weight.device
        with torch.inference_mode():
            return self.model.predict_durations(ids.to(device)).cpu()

    def decode(self, ids: torch.Tensor, durations: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """``[T]`` unit ids -> ``[frames * hop]`` float waveform (on the vocoder's device).

        ``durations`` (frames per id, from a deduplicated record) are used when given;
        otherwise the duration predictor runs if :attr:`dur_prediction`; otherwise one
        frame per id.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            bad = int(ids.max()) if int(ids.max()) >= self.num_embeddings else int(ids.min())
            raise CodecError(f"unit id {bad} is out of range for vocoder {self.path} ({self.num_embeddings} units)")
        if durations is not None:
            durations = torch.as_tensor(durations, dtype=torch.long)
            if durations.shape != ids.shape or (durations.numel() and int(durations.min()) < 1):
                raise CodecError(f"durations must be one positive count per unit ({ids.numel()} units, "
                                 f"{durations.numel()} durations)")
        elif self.dur_prediction and ids.numel():
            durations = self.predict_durations(ids)
        if durations is not None:
            ids = torch.repeat_interleave(ids, durations)
        device = self.model.dict.weight.device
        if not ids.numel():
            return torch.zeros(0, device=device)
        with torch.inference_mode():
            return self.model(ids.to(device), self.speaker, self.style)


def load_vocoder(path: str | Path, config: str | Path | None = None, *, speaker: int | None = None,
                 style: int | None = None, dur_prediction: bool | None = None,
                 device: torch.device | str = "cpu") -> UnitVocoder:
    """Load a fairseq / speech-resynthesis CodeHiFiGAN checkpoint (``{"generator": ...}``).

    ``config`` defaults to ``config.json`` beside the checkpoint. Nothing in the checkpoint
    is executed. Raises :class:`~teal_cli.errors.CodecError` naming the file and the key
    for a missing file, a config the network cannot use, or weights that do not fit it.
    """
    path = Path(path)
    config_path = Path(config) if config is not None else path.parent / CONFIG_NAME
    if not path.is_file():
        raise CodecError(f"{path}: no such vocoder checkpoint")
    if not config_path.exists():
        hint = "" if config is not None else " (give --vocoder-config, or put the vocoder's config.json beside it)"
        raise CodecError(f"{config_path}: vocoder config not found{hint}")
    cfg = parse_config(read_json(config_path, "vocoder config"), str(config_path))
    root = read_torch(path, what=str(path))
    state = root.get("generator") if isinstance(root, dict) else None
    if not isinstance(state, dict):
        keys = ", ".join(map(str, list(root)[:6])) if isinstance(root, dict) else type(root).__name__
        raise CodecError(f"{path}: no 'generator' state dict (found {keys}); expected a CodeHiFiGAN checkpoint")
    where = f"{path} (config {config_path})"
    model = CodeHiFiGAN(cfg)
    safe_pickle.load_strict(model, fold_weight_norm(state, str(path)), where)
    return UnitVocoder(model, str(path), speaker=speaker, style=style, dur_prediction=dur_prediction).to(device)
