"""Speech out: a TEAL model that writes audio (tiny models, no download).

- stacked mel frames (``teal cluster --features mel --stack N``): shapes, frame rate, inversion;
- a model that reads one audio codec and writes another learns ``[text][audio]`` (stage 1)
  and ``text-to-speech`` (stage 2), ends its segments itself with ``</aud>`` (the training
  loss scores it), and ``teal generate --output-modality audio | teal detokenize`` writes a
  WAV whose length is its ids times the codec's frame length;
- the any-to-any pipes as a user types them (image in -> speech out, speech in -> image out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_llm import make_tiny_llm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WORDS = ["zero", "one", "two", "three"]
# Each word's speech in the output codec: 4 ids, distinct per word.
SPEECH = {0: [1, 2, 3, 4], 1: [5, 6, 7, 8], 2: [9, 10, 11, 12], 3: [13, 14, 15, 0]}
OUT_CODEC = "mel-80-x2-k16"
IN_CODEC = "mel-80-k32"


def test_stacked_mel_frames_have_the_stacked_rate_and_invert_to_the_same_length():
    from teal_cli.features.mel import MelFeatures

    plain, stacked = MelFeatures(80), MelFeatures(80, stack=4)
    wave = torch.randn(16000) * 0.1
    a, b = plain.extract([wave])[0], stacked.extract([wave])[0]
    assert a.shape == (100, 80) and b.shape == (25, 320) and stacked.frame_rate == 25.0
    torch.testing.assert_close(b.reshape(-1, 80), a)  # frames side by side, in time order
    assert stacked.name_stem() == "mel-80-x4" and stacked.config()["stack"] == 4 and "stack" not in plain.config()
    assert stacked.invert(b[:3]).shape == (12 * 160,)
    assert MelFeatures.from_config(stacked.config()).dim == 320
    odd = stacked.extract([wave[: 16000 - 160 * 3]])[0]  # 97 frames: the last 1 is dropped
    assert odd.shape == (24, 320)


def test_cluster_stack_is_for_mel_features_only(isolated, tmp_path):
    from typer.testing import CliRunner

    from teal_cli.cli import app

    res = CliRunner().invoke(app, ["cluster", str(tmp_path), "--features", "patch", "--stack", "2", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--stack 2: only mel features" in res.output, res.output


@pytest.fixture(scope="module")
def speech_model(tmp_path_factory):
    """A tiny model that reads a 100 Hz mel codec and writes a 50 Hz stacked one, trained on
    "say <word>" -> 4 ids: stage 1 on the pairs, stage 2 on them as text-to-speech requests."""
    from teal_cli.codecs.kmeans_codec import load_codec_dir, save_codec_dir
    from teal_cli.features.mel import MelFeatures
    from teal_cli.model import init_model
    from teal_cli.model.llm import load_base_llm
    from teal_cli.train import TrainOptions, train

    root = tmp_path_factory.mktemp("speech")
    gen = torch.Generator().manual_seed(0)
    codecs = root / "codecs"
    patch_dir = codecs / "patch-p2-k16"
    from teal_cli.features.patch import PatchFeatures

    save_codec_dir(patch_dir, PatchFeatures(2, image_size=8), torch.rand(16, 12, generator=gen), {})
    save_codec_dir(codecs / IN_CODEC, MelFeatures(80), torch.randn(32, 80, generator=gen), {})
    save_codec_dir(codecs / OUT_CODEC, MelFeatures(80, stack=2), torch.randn(16, 160, generator=gen) - 2, {})
    llm = make_tiny_llm(root / "tiny-llama", "llama", seed=0, hidden=64, layers=2, context=256)
    dirs = [patch_dir, codecs / IN_CODEC, codecs / OUT_CODEC]
    model = init_model(load_base_llm(str(llm)), [load_codec_dir(p) for p in dirs], roles=["both", "input", "output"],
                       image_size=8, seed=0, codec_paths=[str(p) for p in dirs])
    out = root / "model"
    model.save(out)
    data = root / "tts.jsonl"
    with data.open("w") as f:
        for i in range(64):
            label = i % 4
            f.write(json.dumps({"v": 1, "id": f"{i}", "task": "text-to-speech", "segments": [
                {"modality": "text", "text": f"say {WORDS[label]}"},
                {"modality": "audio", "codec": OUT_CODEC, "frame_rate": 50, "tokens": SPEECH[label]}]}) + "\n")
    common = dict(data=str(data), device="cpu", checkpoint_every=0, batch_size=16, seed=0)
    first = train(out, TrainOptions(stage=1, max_steps=20, lr=1e-2, **common))
    second = train(out, TrainOptions(stage=2, max_steps=80, lr=3e-2, **common))
    return {"root": root, "model": out, "codecs": codecs, "first": first, "second": second, "patch": patch_dir}


def _request(label: int, template: str | None = "Say this aloud: {input}\n"):
    from teal_cli.records import Record, Segment
    from teal_cli.train.templates import render

    rec = Record(id=f"say-{label}", segments=[Segment("text", text=f"say {WORDS[label]}"),
                                              Segment("audio", codec=OUT_CODEC, tokens=SPEECH[label], frame_rate=50)])
    rendered = render(rec, template, ["prompt", "target"])
    rendered.segments = [s for s in rendered.segments if s.extra.get("role") != "target"]
    return rendered


def test_a_model_learns_to_speak_and_ends_its_speech_with_the_close_token(speech_model, monkeypatch):
    from teal_cli.model.generate import GenerateOptions, generate

    first, second = speech_model["first"], speech_model["second"]
    assert first.val_loss < first.losses[0], (first.losses[::5], first.val_loss)
    assert second.losses[-1] < 0.3, second.losses[::10]
    monkeypatch.setenv("TEAL_CODEC_PATH", str(speech_model["codecs"]))
    out = list(generate(second.model, [_request(k) for k in range(4)],
                        GenerateOptions(output_modality="audio", max_audio_seconds=1.0)))
    segs = [r.segments[0] for r in out]
    assert all(s.modality == "audio" and s.codec == OUT_CODEC and s.frame_rate == 50 for s in segs)
    # The cap is 50 ids; the model ends each segment after its 4 ids with </aud>.
    assert [len(s.tokens) for s in segs] == [4, 4, 4, 4], [s.tokens for s in segs]
    assert sum(s.tokens == SPEECH[k] for k, s in enumerate(segs)) >= 3, [s.tokens for s in segs]


def _teal(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "teal_cli", *args], input=input, capture_output=True, env=env, timeout=300)


def test_generate_audio_then_detokenize_writes_a_wav_as_long_as_the_ids(speech_model, tmp_path):
    import soundfile as sf

    env = {**os.environ, "TEAL_CODEC_PATH": str(speech_model["codecs"]), "OMP_NUM_THREADS": "1"}
    prompt = tmp_path / "p.jsonl"
    prompt.write_text(json.dumps(_request(2).to_json()) + "\n")
    gen = _teal("generate", str(prompt), "--model", str(speech_model["model"]), "--output-modality", "audio",
                "--max-audio-seconds", "1", env=env)
    assert gen.returncode == 0, gen.stderr.decode()[-2000:]
    rec = json.loads(gen.stdout)
    seg = rec["segments"][0]
    assert seg["modality"] == "audio" and rec["generation"]["finish"] == "segment" and len(seg["tokens"]) == 4, rec
    det = _teal("detokenize", "-o", str(tmp_path / "two.wav"), input=gen.stdout, env=env)
    assert det.returncode == 0, det.stderr.decode()[-2000:]
    wave, rate = sf.read(tmp_path / "two.wav")
    assert rate == 16000 and len(wave) == 4 * 2 * 160  # 4 ids of 2 stacked 10 ms frames


def test_any_to_any_pipes_as_written(speech_model, tmp_path):
    """``teal tokenize seven.png -c C | teal generate --output-modality audio | teal detokenize
    -o seven.wav`` and the reverse direction (speech in, image out), as shell pipes."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    env = {**os.environ, "TEAL_CODEC_PATH": str(speech_model["codecs"]), "TEAL_MODEL": str(speech_model["model"]),
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if shutil.which("teal", path=env["PATH"]) is None:
        pytest.fail("the teal command is not installed beside this Python")
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).convert("RGB").save(tmp_path / "seven.png")
    sf.write(tmp_path / "seven.wav", (np.sin(np.arange(4000) / 9) * 0.3).astype(np.float32), 16000)
    image_in = subprocess.run(
        "teal tokenize seven.png -c patch-p2-k16 | teal generate --output-modality audio --max-audio-seconds 0.3 "
        "| teal detokenize -o said.wav", shell=True, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert image_in.returncode == 0, image_in.stderr.decode()[-2000:]
    wave, rate = sf.read(tmp_path / "said.wav")
    ids = len(wave) // 320
    assert rate == 16000 and len(wave) == ids * 320 and 1 <= ids <= 15  # whole 20 ms ids, at most the 0.3 s cap
    speech_in = subprocess.run(
        f"teal tokenize seven.wav -c {IN_CODEC} | teal generate --output-modality image | teal detokenize -o drawn.png",
        shell=True, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert speech_in.returncode == 0, speech_in.stderr.decode()[-2000:]
    assert Image.open(tmp_path / "drawn.png").size == (8, 8)
