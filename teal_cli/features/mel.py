"""Log-mel frames: the weight-free audio features behind ``mel-{n}-k{K}`` codecs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..media import logmel as audio
from ..errors import UsageError
from .base import FeatureExtractor

if TYPE_CHECKING:
    import torch


class MelFeatures(FeatureExtractor):
    """Whisper's log-mel front end (see :mod:`teal_cli.media.logmel`): one ``n_mels`` vector per
    10 ms hop, 100 frames per second at 16 kHz. Invertible through Griffin-Lim."""

    kind = "mel"
    modality = "audio"
    invertible = True
    sample_rate = audio.SAMPLE_RATE
    frame_rate = audio.MEL_FRAME_RATE

    def __init__(self, n_mels: int = audio.N_MELS):
        if n_mels not in (80, 128):
            raise UsageError(f"--n-mels {n_mels}: expected 80 or 128 (Whisper's front ends)")
        self.n_mels = n_mels
        self.dim = n_mels

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> "MelFeatures":
        if int(config.get("sample_rate", audio.SAMPLE_RATE)) != audio.SAMPLE_RATE:
            raise UsageError(f"mel features at {config['sample_rate']} Hz are not supported (16000 only)")
        return cls(n_mels=int(config.get("n_mels", audio.N_MELS)))

    @classmethod
    def from_name(cls, name: str, n_mels: int = audio.N_MELS, **_: Any) -> "MelFeatures":
        return cls(n_mels=n_mels)

    def config(self) -> dict[str, Any]:
        return {"kind": "mel", "n_mels": self.n_mels, "sample_rate": self.sample_rate, "hop_length": audio.HOP_LENGTH}

    def name_stem(self) -> str:
        return f"mel-{self.n_mels}"

    def extract(self, waves: "list[torch.Tensor]") -> "list[torch.Tensor]":
        """Waveforms to ``[frames, n_mels]``, ``frames = len(wave) // 160``."""
        return [audio.log_mel(w.to(self.device), self.n_mels).T.contiguous() for w in waves]

    def invert(self, features: "torch.Tensor") -> "torch.Tensor":
        """``[frames, n_mels]`` to a waveform at 16 kHz (Griffin-Lim)."""
        return audio.mel_to_wave(features.T.float())
