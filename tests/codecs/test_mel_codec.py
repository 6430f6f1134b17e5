"""The mel codec: Whisper-style log-mel frames, k-means ids, Griffin-Lim decoding."""

import json

import numpy as np
import soundfile as sf
import torch

from teal_cli.media import logmel as audio
from teal_cli.codecs import load_codec


def test_log_mel_shape_range_and_filters(speechlike_wave):
    logm = audio.log_mel(speechlike_wave)
    assert logm.shape == (80, len(speechlike_wave) // audio.HOP_LENGTH)
    # Whisper's scaling: floor at max - 8 decades, then (x + 4) / 4.
    assert float(logm.max() - logm.min()) <= 2.0 + 1e-6
    filters = audio.mel_filters(80)
    assert filters.shape == (80, 201) and (filters >= 0).all()
    # Slaney-normalised triangles: each band's weights sum to about 2 / bandwidth_in_bins.
    assert (filters.sum(dim=1) > 0).all()


def test_mel_codec_round_trip(wav_file, cli):
    r = cli("cluster", wav_file, "--features", "mel", "--k", "32", "--iters", "15", "-q")
    assert r.exit_code == 0, r.stderr
    codec_dir = r.stdout.strip()
    assert codec_dir.endswith("mel-80-k32")
    tok = cli("tokenize", wav_file, "--codec", codec_dir, "--dedup", "-q")
    assert tok.exit_code == 0, tok.stderr
    seg = json.loads(tok.stdout)["segments"][0]
    assert seg["frame_rate"] == 100 and seg["codec"] == "mel-80-k32"
    assert sum(seg["durations"]) == 150  # 1.5 s at 100 frames/s, after dedup
    assert all(a != b for a, b in zip(seg["tokens"], seg["tokens"][1:]))
    out = cli("detokenize", "-o", "back.wav", "-q", input=tok.stdout)
    assert out.exit_code == 0, out.stderr
    wave, sr = sf.read("back.wav")
    assert sr == 16000 and abs(len(wave) - 24000) <= audio.HOP_LENGTH
    # The decoded sound re-tokenizes mostly to the same ids: Griffin-Lim recovered the
    # quantized spectrogram (random or silent audio would agree on a few percent at most).
    codec = load_codec(codec_dir)
    again = codec.encode([torch.from_numpy(wave).float()])[0]
    original = torch.repeat_interleave(torch.tensor(seg["tokens"]), torch.tensor(seg["durations"]))
    n = min(len(again), len(original))
    agreement = (again[:n] == original[:n]).float().mean().item()
    assert agreement > 0.5, agreement


def test_mel_to_wave_restores_spectrum(speechlike_wave):
    logm = audio.log_mel(speechlike_wave)
    wave = audio.mel_to_wave(logm, n_iter=32)
    back = audio.log_mel(wave)
    n = min(back.shape[1], logm.shape[1])
    err = (back[:, :n] - logm[:, :n]).abs().mean().item()
    assert err < 0.08, err  # in Whisper's scaled units (1.0 = 4 decades)


def test_very_short_clips(wav_file, cli, tmp_path):
    cli("cluster", wav_file, "--features", "mel", "--k", "8", "--iters", "3", "-q")
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "short.wav", (0.1 * rng.standard_normal(300)).astype(np.float32), 16000)
    sf.write(tmp_path / "tiny.wav", (0.1 * rng.standard_normal(100)).astype(np.float32), 16000)
    r = cli("tokenize", tmp_path / "short.wav", "--codec", "mel-80-k8", "-q")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["segments"][0]["tokens"]) == 1  # 300 samples = one 10 ms frame
    r = cli("tokenize", tmp_path / "tiny.wav", "--codec", "mel-80-k8")
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ") and "tiny.wav" in r.stderr and "shorter than one 100 Hz frame" in r.stderr


def test_log_mel_extended_with_silence_equals_computing_the_zeros():
    """Rows cut one FFT after the longest clip, extended with silent frames, give the 30 s
    rows' log-mels (Whisper's singles path relies on it): the same frames and floor, up to
    float rounding, since the FFTs and the filterbank product run over other batch lengths
    (on an AMD EPYC 30 values of [401, 200, 1] differ by one float32 ulp)."""
    import torch

    g = torch.Generator().manual_seed(0)
    for lengths in ([160000, 80000, 5], [audio.N_SAMPLES, 1000], [401, 200, 1]):
        full = torch.zeros(len(lengths), audio.N_SAMPLES + audio.N_FFT)
        cut = torch.zeros(len(lengths), max(lengths) + audio.N_FFT)
        for i, n in enumerate(lengths):
            wave = 0.1 * torch.randn(n, generator=g)
            full[i, :n] = wave
            cut[i, :n] = wave
        expected = audio.log_mel(full)[..., : audio.N_FRAMES]
        got = audio.log_mel(cut, extend_to=audio.N_FRAMES)[..., : audio.N_FRAMES]
        assert got.shape == expected.shape, lengths
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{lengths}: {m}")
    for n in (audio.N_SAMPLES + 12345, 2 * audio.N_SAMPLES, 70 * audio.SAMPLE_RATE + 7):  # long clips, Whisper's padding
        wave = 0.1 * torch.randn(n, generator=g)
        expected = audio.log_mel(wave, padding=audio.N_SAMPLES)
        got = audio.log_mel(wave, padding=audio.N_FFT, extend_to=(n + audio.N_SAMPLES) // audio.HOP_LENGTH)
        assert got.shape == expected.shape, n
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_audio_codec_assigns_a_batch_as_each_clip_alone(wav_file, cli, speechlike_wave):
    """A batch's frames are assigned in one pass: the ids must be those of each clip's own
    features, split back per clip."""
    from teal_cli.codecs.assign import assign

    r = cli("cluster", wav_file, "--features", "mel", "--k", "16", "--iters", "5", "-q")
    assert r.exit_code == 0, r.stderr
    codec = load_codec(r.stdout.strip())
    clips = [speechlike_wave, speechlike_wave[:4000].flip(0), speechlike_wave[1000:9000] * 0.3]
    together = codec.encode(clips)
    assert [t.shape for t in together] == [(len(c) // audio.HOP_LENGTH,) for c in clips]
    for clip, ids in zip(clips, together):
        alone = assign(codec.extractor.extract([clip])[0], codec.centroids)[0]
        assert torch.equal(ids, alone)
    assert len(set(torch.cat(together).tolist())) > 3
