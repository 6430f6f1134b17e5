"""teal cluster end to end: learned audio features through the CLI, the feature cache over a
k sweep, streaming fits beyond the memory budget, and provenance checks on load."""

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from teal_cli.cluster.fit import ClusterOptions, fit_codec
from teal_cli.codecs import load_codec
from teal_cli.codecs.kmeans_codec import load_codec_dir
from teal_cli.errors import CodecError
from teal_cli.features import extractor_for


@pytest.fixture
def clips(tmp_path, speechlike_wave):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"c{i}.wav", speechlike_wave.roll(i * 3000).numpy(), 16000)
    return folder


def test_whisper_cluster_k_sweep_reuses_cache_then_tokenizes(cli, tiny_whisper_pt, clips, monkeypatch):
    import teal_cli.cluster.fit as cluster

    loads = []
    real_load = cluster._load
    monkeypatch.setattr(cluster, "_load", lambda *a: loads.append(a[1]) or real_load(*a))
    common = ["--features", "whisper-tiny", "--checkpoint", tiny_whisper_pt, "--layer", "1",
              "--features-cache", "feats", "--iters", "5", "-q"]
    r = cli("cluster", clips, "--k", "8", *common)
    assert r.exit_code == 0, r.stderr
    assert len(loads) == 3
    r = cli("cluster", clips, "--k", "4", *common)
    assert r.exit_code == 0, r.stderr
    assert len(loads) == 3, "the second k of the sweep must extract nothing"
    directory = Path(r.stdout.strip())
    assert directory.name == "whisper-d32x2-l1-k4"
    config = json.loads((directory / "config.json").read_text())
    assert config["features"]["layer"] == 1 and config["k"] == 4 and config["fit"]["vectors"] == 3 * 75

    tok = cli("tokenize", clips / "c0.wav", "--codec", directory, "--dedup", "-q")
    assert tok.exit_code == 0, tok.stderr
    seg = json.loads(tok.stdout)["segments"][0]
    assert seg["codec"] == "whisper-d32x2-l1-k4" and seg["frame_rate"] == 50
    assert sum(seg["durations"]) == 75 and max(seg["tokens"]) < 4
    out = cli("detokenize", "-o", "x.wav", input=tok.stdout)
    assert out.exit_code == 1 and "unit vocoder" in out.stderr
    assert not Path("x.wav").exists()

    # The same codec used with features from another layer is refused.
    other = extractor_for("whisper-tiny", checkpoint=str(tiny_whisper_pt), layer=2)
    with pytest.raises(CodecError, match="layer"):
        load_codec_dir(directory, features=other)


def test_cluster_batch_size_and_workers(cli, tiny_whisper_pt, clips, monkeypatch):
    """--batch-size sets the files extracted together, --workers the loader threads; neither
    changes the codec."""
    import threading

    import teal_cli.cluster.fit as cluster
    from teal_cli.features.whisper import WhisperFeatures

    batches, threads = [], set()
    real_extract, real_load = WhisperFeatures.extract, cluster._load
    monkeypatch.setattr(WhisperFeatures, "extract", lambda self, waves: batches.append(len(waves)) or real_extract(self, waves))
    monkeypatch.setattr(cluster, "_load", lambda *a: threads.add(threading.current_thread().name) or real_load(*a))
    common = ["--features", "whisper-tiny", "--checkpoint", tiny_whisper_pt, "--layer", "1", "--k", "4", "--iters", "5", "-q"]
    r = cli("cluster", clips, *common, "--batch-size", "2", "--workers", "1", "-o", "small")
    assert r.exit_code == 0, r.stderr
    assert batches == [2, 1] and threads == {"teal-load_0"}
    batches.clear()
    r = cli("cluster", clips, *common, "-o", "default")
    assert r.exit_code == 0, r.stderr
    assert batches == [3]
    torch.testing.assert_close(load_codec_dir("small").centroids, load_codec_dir("default").centroids, rtol=1e-4, atol=1e-4)


def test_streaming_fit_matches_in_memory(photo):
    items = [("photo", str(photo))] * 3
    extractor = extractor_for("patch", patch_size=4, image_size=64)
    small = fit_codec(items, extractor, "mem", ClusterOptions(k=16, iters=15))
    streamed = fit_codec(items, extractor, "stream", ClusterOptions(k=16, iters=15, memory_budget=1))
    assert streamed.streaming and not small.streaming
    assert streamed.rows == small.rows == 3 * 256 and streamed.files == 3
    # The streaming fit sees the same data (via a sample, then full passes): close inertia.
    assert streamed.result.inertia <= small.result.inertia * 1.10
    assert load_codec("stream").vocab_size == 16


def test_km_bin_export_import_round_trip(cli, wav_file):
    r = cli("cluster", wav_file, "--features", "mel", "--k", "8", "--iters", "3", "--export-km", "mel.km.bin", "-q")
    assert r.exit_code == 0, r.stderr
    fitted = load_codec("mel-80-k8").centroids
    r = cli("cluster", "--import-km", "mel.km.bin", "--features", "mel", "-o", "codecs/imported-mel-80-k8", "-q")
    assert r.exit_code == 0, r.stderr
    assert torch.equal(load_codec("imported-mel-80-k8").centroids, fitted)
    # Centroids of the wrong width for the features asked are refused, naming the file.
    r = cli("cluster", "--import-km", "mel.km.bin", "--features", "patch", "--patch-size", "2")
    assert r.exit_code == 1 and "mel.km.bin" in r.stderr and "dim 12" in r.stderr


def test_iter_features_keeps_order_across_batches_and_names_a_nan_input(clips, tiny_whisper_pt):
    """Extraction is pipelined (batch N-1 is checked and handed out after batch N is launched):
    outputs must still come in input order, equal to one-at-a-time extraction, and a NaN
    feature must stop the run with the id of the input that produced it."""
    from teal_cli.cluster.fit import ClusterReport, iter_features

    extractor = extractor_for("whisper-tiny-random", checkpoint=str(tiny_whisper_pt), layer="1")
    paths = sorted(clips.iterdir())
    items = [(f"clip{i}", str(paths[i % len(paths)])) for i in range(7)]
    report = ClusterReport()
    got = list(iter_features(items, extractor, ClusterOptions(batch_size=2), report))
    assert report.files == 7 and len(got) == 7
    for (key, path), feats in zip(items, got):
        from teal_cli.cluster.fit import _extract_batch, _load

        alone = _extract_batch(extractor, [_load(extractor, path, ClusterOptions())])[0]
        torch.testing.assert_close(feats, alone, rtol=1e-5, atol=1e-5, msg=key)

    real_extract = extractor.extract

    def poisoned(waves):
        out = real_extract(waves)
        if len(waves) == 1:  # the last, short batch: item 'clip6'
            out[0][3, 0] = float("nan")
        return out

    extractor.extract = poisoned
    with pytest.raises(Exception, match="clip6: whisper features contain NaN"):
        list(iter_features(items, extractor, ClusterOptions(batch_size=2), ClusterReport()))


@pytest.mark.parametrize("check_once", [True, False])
def test_finite_check_names_the_clip_inside_a_batch(monkeypatch, check_once):
    """A batch is checked as one tensor (or clip by clip when too big); a NaN or inf names the
    clip that has it, not its batch's first."""
    from teal_cli.cluster import fit as cluster

    if not check_once:
        monkeypatch.setattr(cluster, "FINITE_CHECK_ONCE", 0)
    feats = [torch.ones(3, 4), torch.ones(5, 4), torch.ones(0, 4), torch.ones(2, 4)]
    assert cluster._finite_flags(feats)() == [True] * 4
    feats[1][4, 2] = float("inf")
    feats[3][0, 0] = float("nan")
    assert cluster._finite_flags(feats)() == [True, False, True, False]
    assert cluster._finite_flags([])() == []



def test_sampled_fit_reports_the_inertia_of_all_rows(photo):
    """--sample fits on a subset; the reported inertia is then measured over every row."""
    items = [("photo", str(photo))] * 2
    extractor = extractor_for("patch", patch_size=4, image_size=64)
    report = fit_codec(items, extractor, "sampled", ClusterOptions(k=8, iters=5, sample=100))
    assert report.rows == 2 * 256 and not report.streaming
    # history[-1] is the inertia of the 100 sampled rows; all 512 rows hold about 5x as much.
    assert report.result.inertia > 2 * report.result.history[-1]
