"""Audio front end shared by the mel codec and speech-model features.

The log-mel computation follows Whisper's exactly (16 kHz, 25 ms Hann window, 10 ms hop,
Slaney-style mel filters, log10 with an 8-decade floor, then ``(x + 4) / 4``), so the same
function feeds Whisper encoders and the weight-free ``mel`` codec. The filters are computed
here (the formula librosa uses), not loaded from a file.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms -> 100 mel frames per second
N_MELS = 80
CHUNK_LENGTH = 30  # Whisper's window, seconds
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
MEL_FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # 100.0


def _hz_to_mel(freq: "np.ndarray") -> "np.ndarray":  # noqa: F821
    import numpy as np

    # Slaney: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
    f_sp = 200.0 / 3
    mels = freq / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(freq >= min_log_hz, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(mels: "np.ndarray") -> "np.ndarray":  # noqa: F821
    import numpy as np

    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


@lru_cache(maxsize=8)
def _mel_filters_np(n_mels: int, n_fft: int, sample_rate: int):
    import numpy as np

    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, None]  # equal area per band
    return weights.astype(np.float32)


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, device=None) -> "torch.Tensor":
    """``[n_mels, n_fft // 2 + 1]`` Slaney mel filterbank (float32), kept per device: a fresh
    host-to-GPU copy on every call would synchronise the stream once per batch."""
    import torch

    return _mel_filters_on(n_mels, n_fft, sample_rate, torch.device(device or "cpu"))


@lru_cache(maxsize=16)
def _mel_filters_on(n_mels: int, n_fft: int, sample_rate: int, device) -> "torch.Tensor":
    import torch

    return torch.from_numpy(_mel_filters_np(n_mels, n_fft, sample_rate)).to(device)


def log_mel(wave: "torch.Tensor", n_mels: int = N_MELS, padding: int = 0, extend_to: int | None = None) -> "torch.Tensor":
    """Whisper's log-mel spectrogram of a mono waveform ``[T]`` (or a batch ``[B, T]``).

    Returns ``[n_mels, frames]`` (``[B, n_mels, frames]``) with ``frames = (T + padding) // HOP_LENGTH``.
    ``padding`` appends zeros first, as Whisper does before its 30 s windows. The floor
    (max - 8) is taken over each whole clip, padding included, exactly as Whisper does.
    ``extend_to`` adds frames up to that many with the value of a frame of silence, without
    computing them: what appending zeros to ``wave`` would give when ``wave`` already ends in
    at least ``N_FFT`` zeros (each frame after it sees zeros only), floor included, up to
    float rounding (the FFTs then run over another length: values may differ by an ulp).
    """
    import torch

    if padding:
        wave = torch.nn.functional.pad(wave, (0, padding))
    frames = wave.shape[-1] // HOP_LENGTH
    if frames == 0 and not extend_to:  # under one hop: no frames (and no floor to take)
        return wave.new_zeros((*wave.shape[:-1], n_mels, 0), dtype=torch.float32)
    if wave.shape[-1] <= N_FFT // 2:
        # stft's reflect padding needs more than half a window; zeros past the end of a
        # clip this short only touch frames that are trimmed off below.
        wave = torch.nn.functional.pad(wave, (0, N_FFT // 2 + 1 - wave.shape[-1]))
    window = torch.hann_window(N_FFT, device=wave.device)
    stft = torch.stft(wave.float(), N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :frames].abs() ** 2
    mel = mel_filters(n_mels, device=wave.device) @ power
    logm = mel.clamp(min=1e-10).log10()
    if extend_to is not None and extend_to > logm.shape[-1]:
        silent = torch.zeros((), device=logm.device).clamp(min=1e-10).log10()  # an all-zero frame's value
        logm = torch.cat([logm, silent.expand(*logm.shape[:-1], extend_to - logm.shape[-1])], dim=-1)
    floor = logm.amax(dim=(-2, -1), keepdim=True) - 8.0
    logm = torch.maximum(logm, floor)
    return (logm + 4.0) / 4.0


def mel_to_wave(logm: "torch.Tensor", n_iter: int = 32, seed: int = 0) -> "torch.Tensor":
    """Invert :func:`log_mel` approximately: undo the log, spread mel power back to linear
    frequencies with the filterbank's pseudo-inverse, then Griffin-Lim phase recovery.

    ``logm`` is ``[n_mels, frames]``; returns a waveform of ``frames * HOP_LENGTH`` samples.
    """
    import torch

    n_mels, frames = logm.shape
    mel_power = torch.pow(10.0, logm.float() * 4.0 - 4.0)
    filters = mel_filters(n_mels, device=logm.device)
    power = (torch.linalg.pinv(filters) @ mel_power).clamp(min=0.0)
    magnitude = power.sqrt()
    # torch.stft drops nothing but Whisper drops the last frame: add one back for istft.
    magnitude = torch.cat([magnitude, magnitude[:, -1:]], dim=1)
    window = torch.hann_window(N_FFT, device=logm.device)
    length = frames * HOP_LENGTH
    gen = torch.Generator(device="cpu").manual_seed(seed)
    phase = torch.rand(magnitude.shape, generator=gen).to(logm.device) * 2 * math.pi
    spec = torch.polar(magnitude, phase)
    for _ in range(n_iter):
        wave = torch.istft(spec, N_FFT, HOP_LENGTH, window=window, length=length)
        rebuilt = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, return_complex=True)
        spec = torch.polar(magnitude, torch.angle(rebuilt))
    wave = torch.istft(spec, N_FFT, HOP_LENGTH, window=window, length=length)
    peak = wave.abs().max()
    return wave / peak * 0.9 if peak > 0.9 else wave
