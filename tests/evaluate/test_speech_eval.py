"""``teal eval speech-gen``: generated speech judged by a speech judge (.npz) or a Whisper ASR
judge (WER/CER by jiwer), segments closed vs capped, durations, and the report's players."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CODEC = "mel-80-x2-k8"
RATE = 16000


def tone(freq: float, seconds: float = 0.3, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


@pytest.fixture
def speech_codec(isolated):
    """An 8-id codec of stacked mel frames: ids 0-3 are a low tone's frames, 4-7 a high tone's."""
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features.mel import MelFeatures

    feats = MelFeatures(80, stack=2)
    low, high = feats.extract([torch.from_numpy(tone(300, 0.2))])[0], feats.extract([torch.from_numpy(tone(2500, 0.2))])[0]
    centroids = torch.cat([low[2:6], high[2:6]])
    path = save_codec_dir(isolated / "codecs" / CODEC, feats, centroids, {})
    return path


def _judge(seed=0):
    from teal_cli.evaluate.speech import fit_speech_judge

    rng = np.random.default_rng(seed)
    train = [tone(f, 0.3, p) for f in (250, 300, 350) for p in rng.uniform(0, 6, 4)] + \
            [tone(f, 0.3, p) for f in (2200, 2500, 2800) for p in rng.uniform(0, 6, 4)]
    labels = ["low"] * 12 + ["high"] * 12
    return fit_speech_judge(train, labels, [tone(320, 0.25), tone(2600, 0.25)], ["low", "high"], name="tones")


def test_speech_judge_round_trips_through_a_pickle_free_npz(tmp_path):
    from teal_cli.errors import DataError
    from teal_cli.evaluate.judge import digits_judge, save_judge
    from teal_cli.evaluate.speech import load_speech_judge, save_speech_judge

    judge = _judge()
    assert judge.test_accuracy == 1.0
    save_speech_judge(judge, tmp_path / "j.npz")
    with np.load(tmp_path / "j.npz", allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
    again = load_speech_judge(tmp_path / "j.npz")
    clips = [tone(280, 0.4), tone(2400, 0.2), tone(2700, 0.5)]
    assert again.classify(clips) == judge.classify(clips) == ["low", "high", "high"]
    assert again.test_accuracy == 1.0
    save_judge(digits_judge(), tmp_path / "image.npz")
    with pytest.raises(DataError, match="not a speech judge"):
        load_speech_judge(tmp_path / "image.npz")


def _records(tmp_path, generated: list[list[int]]):
    refs, preds = tmp_path / "refs.jsonl", tmp_path / "preds.jsonl"
    words = ["low", "high", "low", "high"]
    with refs.open("w") as r, preds.open("w") as p:
        for i, (word, ids) in enumerate(zip(words, generated)):
            r.write(json.dumps({"v": 1, "id": f"r{i}", "label": word, "transcript": word, "segments": [
                {"modality": "text", "text": f"say {word}"},
                {"modality": "audio", "codec": CODEC, "frame_rate": 50, "tokens": [0, 1, 2] if word == "low" else [4, 5, 6]}]}) + "\n")
            p.write(json.dumps({"v": 1, "id": f"r{i}", "segments": [
                {"modality": "audio", "codec": CODEC, "frame_rate": 50, "tokens": ids}]}) + "\n")
    return refs, preds


def test_speech_gen_judges_the_decoded_speech_and_counts_closed_and_capped_segments(speech_codec, tmp_path):
    from teal_cli.evaluate import EvalOptions, run_eval
    from teal_cli.evaluate.report import write_report
    from teal_cli.evaluate.speech import save_speech_judge

    save_speech_judge(_judge(), tmp_path / "j.npz")
    # r0 low (right), r1 high (right), r2 says high for low (wrong), r3 runs to the 0.1 s cap (5 ids)
    refs, preds = _records(tmp_path, [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7], [5, 5, 5, 5, 5]])
    res = run_eval(EvalOptions(task="speech-gen", data=[str(refs)], predictions=str(preds), judge=str(tmp_path / "j.npz"),
                               max_audio_seconds=0.1))
    assert res.metrics["accuracy"] == 0.75
    assert res.counts["closed"] == 3 and res.counts["capped"] == 1 and res.metrics["closed_fraction"] == 0.75
    assert res.metrics["seconds_mean"] == pytest.approx((4 + 4 + 4 + 5) / 4 / 50)
    assert res.metrics["reference_seconds_mean"] == pytest.approx(3 / 50)
    assert res.per_category == {"high": {"accuracy": 1.0, "count": 2}, "low": {"accuracy": 0.5, "count": 2}} or \
        {k: v["accuracy"] for k, v in res.per_category.items()} == {"high": 1.0, "low": 0.5}
    files = write_report(res, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<audio controls") == 4 and (tmp_path / "report" / "spectrograms.png") in files
    assert all((tmp_path / "report" / "audio" / f"r{i}.wav").is_file() for i in range(4))


def test_asr_judge_scores_wer_and_cer_as_jiwer_on_the_same_transcripts(speech_codec, tmp_path, monkeypatch):
    import jiwer

    from teal_cli.evaluate import EvalOptions, run_eval
    from teal_cli.evaluate import speech
    from teal_cli.evaluate.text import asr_normalize

    heard = ["Low.", "hi", "low low", "HIGH"]
    calls = []

    class FakeWhisper:
        name = "fake"

        def __init__(self, directory, device="cpu"):
            pass

        def transcribe(self, waves):
            calls.append(len(waves))
            return list(heard[: len(waves)])

    monkeypatch.setattr(speech, "WhisperJudge", FakeWhisper)
    refs, preds = _records(tmp_path, [[0, 1], [4, 5], [0, 1], [4]])
    res = run_eval(EvalOptions(task="speech-gen", data=[str(refs)], predictions=str(preds), asr_judge=str(tmp_path)))
    truth = [asr_normalize(w) for w in ["low", "high", "low", "high"]]
    hyps = [asr_normalize(h) for h in heard]
    assert calls == [4]
    assert res.metrics["wer"] == pytest.approx(jiwer.wer(truth, hyps)) and 0 < res.metrics["wer"] < 1
    assert res.metrics["cer"] == pytest.approx(jiwer.cer(truth, hyps))


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A random 1-layer Whisper in the Hugging Face folder format (model, tokenizer, feature
    extractor), with a byte-level vocabulary and Whisper's special tokens."""
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor,
                              WhisperTokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    d = tmp_path_factory.mktemp("whisper") / "tiny-whisper"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(bytes_to_unicode().values())}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    eot = "<|endoftext|>"
    tok = WhisperTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)
    tok.add_special_tokens({"additional_special_tokens": ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                                                          "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]})
    ids = tok.convert_tokens_to_ids
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=ids("<|startoftranscript|>"),
                        eos_token_id=ids(eot), pad_token_id=ids(eot), bos_token_id=ids(eot))
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config.no_timestamps_token_id = ids("<|notimestamps|>")
    model.save_pretrained(d)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tok).save_pretrained(d)
    return d


@pytest.mark.slow
def test_cli_speech_gen_with_a_whisper_folder_gives_jiwer_wer_of_its_transcripts(speech_codec, tiny_whisper, tmp_path):
    import jiwer
    from typer.testing import CliRunner

    from teal_cli.cli import app
    from teal_cli.codecs.registry import load_codec
    from teal_cli.evaluate.speech import WhisperJudge
    from teal_cli.evaluate.text import asr_normalize

    refs, preds = _records(tmp_path, [[0, 1, 2], [4, 5, 6], [0, 0], [7, 6]])
    res = CliRunner().invoke(app, ["eval", "speech-gen", "--data", str(refs), "--predictions", str(preds),
                                   "--asr-judge", str(tiny_whisper), "--report", str(tmp_path / "rep"), "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "r.json").read_text())
    codec = load_codec(CODEC)
    waves = [codec.decode(torch.tensor(json.loads(x)["segments"][0]["tokens"])).numpy() for x in preds.read_text().splitlines()]
    hyps = [asr_normalize(h) for h in WhisperJudge(tiny_whisper).transcribe(waves)]
    truth = [asr_normalize(w) for w in ["low", "high", "low", "high"]]
    assert out["metrics"]["wer"] == pytest.approx(jiwer.wer(truth, hyps))
    assert out["metrics"]["cer"] == pytest.approx(jiwer.cer(truth, hyps))
    assert (tmp_path / "rep" / "index.html").read_text().count("<audio controls") == 4


def test_speech_gen_needs_exactly_one_judge(tmp_path):
    from teal_cli.errors import UsageError
    from teal_cli.evaluate import EvalOptions, run_eval

    (tmp_path / "r.jsonl").write_text("")
    for kw in ({}, {"judge": "a.npz", "asr_judge": "w"}):
        with pytest.raises(UsageError, match="one judge"):
            run_eval(EvalOptions(task="speech-gen", data=[str(tmp_path / "r.jsonl")], predictions=str(tmp_path / "r.jsonl"), **kw))


def test_speech_gen_over_nothing_is_an_error_not_a_score(speech_codec, tmp_path):
    """Every reference skipped (its class is not the judge's) leaves nothing to score: an error,
    never an accuracy of 0."""
    from teal_cli.errors import DataError
    from teal_cli.evaluate import EvalOptions, run_eval
    from teal_cli.evaluate.speech import save_speech_judge

    save_speech_judge(_judge(), tmp_path / "j.npz")
    refs, preds = _records(tmp_path, [[0, 1, 2], [4, 5, 6], [0, 1, 2], [4, 5, 6]])
    text = refs.read_text().replace('"label": "low"', '"label": "other"').replace('"label": "high"', '"label": "other"')
    refs.write_text(text)
    with pytest.raises(DataError, match="nothing to score"):
        run_eval(EvalOptions(task="speech-gen", data=[str(refs)], predictions=str(preds), judge=str(tmp_path / "j.npz"),
                             on_error="skip"))
