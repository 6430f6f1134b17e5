"""The feature cache: reuse across runs, never across extractors or edited inputs."""

from __future__ import annotations

import os

import pytest
import torch

from teal_cli.errors import DataError
from teal_cli.cluster.feature_cache import FeatureCache, config_hash
from teal_cli.features.mel import MelFeatures


class CountingMel(MelFeatures):
    """Mel features that count how many clips they were asked to extract."""

    calls = 0

    def extract(self, waves):
        CountingMel.calls += len(waves)
        return super().extract(waves)


def features_for(paths, extractor, cache):
    """What ``teal cluster`` does per input: cache first, extract on a miss."""
    import soundfile as sf

    out = []
    for path in paths:
        cached = cache.get(str(path))
        if cached is None:
            wave, _ = sf.read(path, dtype="float32")
            cached = extractor.extract([torch.from_numpy(wave)])[0]
            cache.put(str(path), cached)
        out.append(cached)
    return out


@pytest.fixture
def wavs(tmp_path, speechlike_wave):
    import soundfile as sf

    paths = []
    for i in range(3):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, (speechlike_wave * (0.5 + 0.2 * i)).numpy(), 16000)
        paths.append(path)
    return paths


def test_second_run_extracts_nothing(tmp_path, wavs):
    CountingMel.calls = 0
    first = FeatureCache(tmp_path / "fc", CountingMel(80))
    a = features_for(wavs, CountingMel(80), first)
    assert CountingMel.calls == 3 and first.misses == 3 and first.hits == 0 and len(first) == 3
    second = FeatureCache(tmp_path / "fc", CountingMel(80))  # a new run, e.g. the next k of a sweep
    b = features_for(wavs, CountingMel(80), second)
    assert CountingMel.calls == 3 and second.hits == 3 and second.misses == 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert (second.folder / "extractor.json").is_file()
    assert second.folder.name.startswith("mel-80-")


def test_other_extractor_config_never_reuses(tmp_path, wavs):
    cache80 = FeatureCache(tmp_path / "fc", MelFeatures(80))
    cache80.put(str(wavs[0]), torch.ones(5, 80))
    cache128 = FeatureCache(tmp_path / "fc", MelFeatures(128))
    assert cache128.folder != cache80.folder and cache128.get(str(wavs[0])) is None
    base = {"kind": "whisper", "model": "whisper-small", "layer": 11, "sha256": "ab", "checkpoint": "/a/small.pt"}
    assert config_hash(base) != config_hash({**base, "layer": 10})
    assert config_hash(base) != config_hash({**base, "sha256": "cd"})
    assert config_hash(base) == config_hash({**base, "checkpoint": "/moved/small.pt"})  # same weights, moved


def test_edited_input_is_a_miss_and_keys_are_checked(tmp_path, wavs):
    cache = FeatureCache(tmp_path / "fc", MelFeatures(80))
    cache.put(str(wavs[0]), torch.zeros(4, 80))
    assert cache.get(str(wavs[0])).shape == (4, 80)
    st = os.stat(wavs[0])
    os.utime(wavs[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.get(str(wavs[0])) is None
    cache.put("not-a-file-id", torch.zeros(2, 80, dtype=torch.float16))
    assert cache.get("not-a-file-id").dtype == torch.float16
    assert cache.get("other-id") is None


def test_atomic_files_and_bad_shapes(tmp_path):
    cache = FeatureCache(tmp_path / "fc", MelFeatures(80))
    with pytest.raises(ValueError):
        cache.put("x", torch.zeros(3))
    cache.put("x", torch.randn(7, 80))
    assert not list(cache.folder.glob("*.tmp")) and not list(cache.folder.glob(".*"))
    cache.path("y").write_bytes(b"garbage")
    with pytest.raises(DataError, match="delete the file"):
        cache.get("y")
    cache.put("z", torch.zeros(3, 12))
    with pytest.raises(DataError, match="expected"):
        cache.get("z")
