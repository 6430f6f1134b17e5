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
    10 ms hop, 100 frames per second at 16 kHz. Invertible through Griffin-Lim.

    ``stack`` > 1 joins that many consecutive frames into one ``stack * n_mels`` vector (frame
    rate ``100 / stack``; a clip's last ``frames % stack`` frames are dropped): a codec written
    by a model then needs ``stack`` times fewer ids per second of speech, each id a short
    stretch of spectrogram (measured for the digits demo: ``examples/digits/run.sh``)."""

    kind = "mel"
    modality = "audio"
    invertible = True
    sample_rate = audio.SAMPLE_RATE
    frame_rate = audio.MEL_FRAME_RATE

    def __init__(self, n_mels: int = audio.N_MELS, stack: int = 1):
        if n_mels not in (80, 128):
            raise UsageError(f"--n-mels {n_mels}: expected 80 or 128 (Whisper's front ends)")
        if not isinstance(stack, int) or stack < 1:
            raise UsageError(f"--stack {stack}: expected a whole number of frames, 1 or more")
        self.n_mels = n_mels
        self.stack = stack
        self.dim = n_mels * stack
        self.frame_rate = audio.MEL_FRAME_RATE / stack

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> "MelFeatures":
        if int(config.get("sample_rate", audio.SAMPLE_RATE)) != audio.SAMPLE_RATE:
            raise UsageError(f"mel features at {config['sample_rate']} Hz are not supported (16000 only)")
        return cls(n_mels=int(config.get("n_mels", audio.N_MELS)), stack=int(config.get("stack", 1)))

    @classmethod
    def from_name(cls, name: str, n_mels: int = audio.N_MELS, stack: int = 1, **_: Any) -> "MelFeatures":
        return cls(n_mels=n_mels, stack=stack)

    def config(self) -> dict[str, Any]:
        config = {"kind": "mel", "n_mels": self.n_mels, "sample_rate": self.sample_rate, "hop_length": audio.HOP_LENGTH}
        if self.stack > 1:  # absent for 1, so codecs fitted before stacking keep their weights id
            config["stack"] = self.stack
        return config

    def name_stem(self) -> str:
        return f"mel-{self.n_mels}" + (f"-x{self.stack}" if self.stack > 1 else "")

    @property
    def min_samples(self) -> int:
        return audio.HOP_LENGTH * self.stack

    def extract(self, waves: "list[torch.Tensor]") -> "list[torch.Tensor]":
        """Waveforms to ``[frames, n_mels * stack]``, ``frames = len(wave) // (160 * stack)``."""
        feats = [audio.log_mel(w.to(self.device), self.n_mels).T.contiguous() for w in waves]
        if self.stack == 1:
            return feats
        return [f[: f.shape[0] // self.stack * self.stack].reshape(-1, self.dim) for f in feats]

    def invert(self, features: "torch.Tensor") -> "torch.Tensor":
        """``[frames, n_mels * stack]`` to a waveform at 16 kHz (Griffin-Lim)."""
        return audio.mel_to_wave(features.reshape(-1, self.n_mels).T.float())
