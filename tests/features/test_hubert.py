"""HuBERT features: tiny random models saved as real Hugging Face folders, transformers as oracle."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from teal_cli.errors import CodecError, UsageError
from teal_cli.features import build_extractor, extractor_for
from teal_cli.features import hubert as hubert_module
from teal_cli.features.hubert import HubertFeatures
from helpers import require

transformers = require("transformers")
DEPTH = 3


@pytest.fixture(scope="module")
def speech(tmp_path_factory, speechlike_wave) -> torch.Tensor:
    exe = shutil.which("espeak-ng")
    if exe is None:
        print("espeak-ng not installed: using the synthetic speech-like signal instead")
        return speechlike_wave
    import soundfile as sf
    import soxr

    path = tmp_path_factory.mktemp("espeak") / "s.wav"
    subprocess.run([exe, "-w", str(path), "seven eight nine"], check=True, capture_output=True)
    wave, sr = sf.read(path, dtype="float32")
    return torch.from_numpy(soxr.resample(wave, sr, 16000)).float()


def tiny_hubert(tmp_path_factory, large: bool):
    config = transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer" if large else "group", do_stable_layer_norm=large, conv_bias=large)
    torch.manual_seed(2 if large else 3)
    model = transformers.HubertModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / ("hubert-large-random" if large else "hubert-base-random")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return tiny_hubert(tmp_path_factory, large=False)


@pytest.fixture(scope="module")
def large_model(tmp_path_factory):
    return tiny_hubert(tmp_path_factory, large=True)


def reference(model, wave, layer, normalize):
    if normalize:
        wave = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        out = model(wave[None], output_hidden_states=True)
    if layer == "final":
        return out.last_hidden_state[0]
    return out.hidden_states[layer][0]


@pytest.mark.parametrize("layer", [0, 2, "final"])
def test_base_matches_transformers(base_model, speech, layer):
    model, folder = base_model
    extractor = HubertFeatures.from_name("hubert", layer=layer, checkpoint=str(folder))
    assert extractor.normalize is False  # group-norm (base) models are trained on raw waveforms
    ours = extractor.extract([speech])[0]
    ref = reference(model, speech, layer, normalize=False)
    assert ours.shape == ref.shape == ((len(speech) - 400) // 320 + 1, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_large_layers_normalisation_and_batching(large_model, speech):
    model, folder = large_model
    extractor = HubertFeatures.from_name("hubert", layer=2, checkpoint=str(folder))
    assert extractor.normalize is True and not extractor.group_norm
    short = speech[: len(speech) // 3]
    feats = extractor.extract([speech, short])
    torch.testing.assert_close(feats[0], reference(model, speech, 2, True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[1], reference(model, short, 2, True), rtol=1e-4, atol=1e-4)  # padded batch
    # Last layer: fairseq's output_layer=N is before the final layer norm; last_hidden_state after it.
    last = HubertFeatures.from_name("hubert", layer=DEPTH, checkpoint=str(folder)).extract([speech])[0]
    with torch.no_grad():
        wave = (speech - speech.mean()) / torch.sqrt(speech.var(unbiased=False) + 1e-7)
        out = model(wave[None], output_hidden_states=True)
        torch.testing.assert_close(model.encoder.layer_norm(last), out.last_hidden_state[0], rtol=1e-4, atol=1e-4)
    assert (out.last_hidden_state[0] - last).abs().max() > 0.1


def test_base_model_batches_clips_of_any_length(base_model, speech):
    """A group-norm (base) model normalises its first conv layer over the whole clip: that
    layer runs clip by clip, the rest of the model once per batch, and every clip gets the
    features it has alone (as transformers gives them), however short or padded."""
    model, folder = base_model
    extractor = HubertFeatures.from_name("hubert", layer=2, checkpoint=str(folder), batch_size=5)
    assert extractor.group_norm and not extractor.normalize
    clips = [speech, speech[: len(speech) // 3], speech[1000:3000], speech[:50], speech.flip(0)]
    forwards = []
    hook = extractor.model.encoder.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    feats = extractor.extract(clips)
    hook.remove()
    assert forwards == [5]  # one forward for all (the 50-sample clip has no frames, but rides along)
    assert feats[3].shape == (0, 32)
    for clip, got in zip(clips, feats):
        if len(clip) >= 400:
            torch.testing.assert_close(got, reference(model, clip, 2, False), rtol=1e-4, atol=1e-4)


def test_long_files_in_chunks(base_model, speech, monkeypatch):
    _, folder = base_model
    monkeypatch.setattr(hubert_module, "MAX_CHUNK", 16000)
    extractor = HubertFeatures.from_name("hubert", layer=1, checkpoint=str(folder))
    ours = extractor.extract([speech[:40000]])[0]
    pieces = [extractor.extract([speech[s : s + 16000]])[0] for s in range(0, 40000, 16000)]
    torch.testing.assert_close(ours, torch.cat(pieces))
    batched = HubertFeatures.from_name("hubert", layer=1, checkpoint=str(folder), batch_size=3)
    torch.testing.assert_close(batched.extract([speech[:40000]])[0], ours, rtol=1e-4, atol=1e-4)  # chunks in one batch


def test_config_names_and_refusals(base_model):
    _, folder = base_model
    extractor = extractor_for("hubert", layer=2, checkpoint=str(folder))
    config = extractor.config()
    assert config["layer"] == 2 and config["normalize"] is False and len(config["sha256"]) == 64
    assert extractor.name_stem() == "hubert-base-random-l2" and extractor.frame_rate == 50
    rebuilt = build_extractor(config)
    assert rebuilt.layer == 2
    with pytest.raises(CodecError, match="layer=2"):
        HubertFeatures.from_name("hubert", layer=1, checkpoint=str(folder)).check_compatible(config, "codecs/x")
    with pytest.raises(UsageError, match="3 transformer layers"):
        HubertFeatures.from_name("hubert", layer=7, checkpoint=str(folder))
    with pytest.raises(UsageError, match="hubert-base-ls960"):
        HubertFeatures.from_name("hubert-tiny")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("which", ["base_model", "large_model"])
def test_cuda_matches_cpu(request, which, speech):
    _, folder = request.getfixturevalue(which)  # base: first layer clip by clip, then one batch
    clips = [speech, speech[: len(speech) // 2]]  # two lengths: one upload, a padding mask
    cpu = HubertFeatures.from_name("hubert", layer=2, checkpoint=str(folder)).extract(clips)
    gpu = HubertFeatures.from_name("hubert", layer=2, checkpoint=str(folder), device="cuda", dtype="float32")
    for got, expected in zip(gpu.extract(clips), cpu):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)
