"""Unit vocoders: official CodeHiFiGAN checkpoints (weight-norm pairs, ``{"generator": ...}``)
decoded by teal against an independent functional forward written here, durations,
speakers, refusals, and the ``teal detokenize --vocoder`` round trip."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from teal_cli.errors import CodecError, UsageError
from teal_cli.codecs.vocoder import load_vocoder

from conftest_image import malicious_torch_file

HOP = 320
BASE_CONFIG = {
    # Official 50 Hz / 16 kHz geometry, tiny widths. Training-only keys are there to be ignored.
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 64,
    "resblock_kernel_sizes": [3, 7],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    "num_embeddings": 16,
    "embedding_dim": 8,
    "model_in_dim": 8,
    "segment_size": 8960,
    "code_hop_size": 320,
    "learning_rate": 0.0002,
    "sampling_rate": 16000,
}
DUR_PARAMS = {"encoder_embed_dim": 8, "var_pred_hidden_dim": 6, "var_pred_kernel_size": 3, "var_pred_dropout": 0.5}
UNITS = [3, 3, 7, 0, 15, 15, 15, 2, 9, 4, 4, 11]


# ---------------------------------------------------------------- the reference checkpoint, built here


def _wn(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


def _wn_new(module: nn.Module) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(module)


class _RefTree(nn.Module):
    """Only a key layout: the module tree of fairseq's CodeGenerator (names and shapes),
    with torch's own weight norm on every generator convolution."""

    def __init__(self, cfg: dict, norm=_wn):
        super().__init__()
        c, dim = cfg["upsample_initial_channel"], cfg["embedding_dim"]
        self.dict = nn.Embedding(cfg["num_embeddings"], dim)
        if cfg.get("multispkr"):
            self.spkr = nn.Embedding(cfg.get("num_speakers", 200), dim)
        if cfg.get("multistyle"):
            self.style = nn.Embedding(cfg.get("num_styles", 100), dim)
        if cfg.get("dur_predictor_params"):
            h = cfg["dur_predictor_params"]["var_pred_hidden_dim"]
            self.dur_predictor = nn.Module()
            self.dur_predictor.conv1 = nn.Sequential(nn.Conv1d(dim, h, 3, padding=1), nn.ReLU())
            self.dur_predictor.ln1 = nn.LayerNorm(h)
            self.dur_predictor.conv2 = nn.Sequential(nn.Conv1d(h, h, 3, padding=1), nn.ReLU())
            self.dur_predictor.ln2 = nn.LayerNorm(h)
            self.dur_predictor.proj = nn.Linear(h, 1)
        self.conv_pre = norm(nn.Conv1d(cfg["model_in_dim"], c, 7, padding=3))
        self.ups = nn.ModuleList(norm(nn.ConvTranspose1d(c >> i, c >> (i + 1), k, u, padding=(k - u) // 2))
                                 for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            for k, dil in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]):
                block = nn.Module()
                if cfg["resblock"] == "1":
                    block.convs1 = nn.ModuleList(norm(nn.Conv1d(c >> (i + 1), c >> (i + 1), k, dilation=d)) for d in dil)
                    block.convs2 = nn.ModuleList(norm(nn.Conv1d(c >> (i + 1), c >> (i + 1), k)) for _ in dil)
                else:
                    block.convs = nn.ModuleList(norm(nn.Conv1d(c >> (i + 1), c >> (i + 1), k, dilation=d)) for d in dil[:2])
                self.resblocks.append(block)
        self.conv_post = norm(nn.Conv1d(c >> len(self.ups), 1, 7, padding=3))


def make_checkpoint(folder: Path, seed: int = 0, norm=_wn, **overrides) -> tuple[Path, dict, dict]:
    """Write ``g_00000100`` + ``config.json`` in the official layout; return them and the raw state."""
    cfg = {**BASE_CONFIG, **overrides}
    torch.manual_seed(seed)
    tree = _RefTree(cfg, norm)
    state = tree.state_dict()
    for key, value in state.items():
        if key.endswith(("weight_g", "original0")):
            value.uniform_(0.6, 1.4)  # magnitudes that differ from ||v||: a fold that ignores g shows
        elif "dur_predictor.proj" in key:
            value.normal_(0.0, 0.4) if key.endswith("weight") else value.fill_(1.2)  # 1..5 frames a unit
        elif "ln" in key:
            value.normal_(1.0 if key.endswith("weight") else 0.0, 0.1)
        else:
            value.normal_(0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "g_00000100"
    torch.save({"generator": state}, path)
    (folder / "config.json").write_text(json.dumps(cfg))
    return path, cfg, state


# ---------------------------------------------------------------- the reference forward, written here


def fold(state: dict) -> dict:
    """weight = g * v / ||v||, the norm over every dim but 0 of the stored weight."""
    out = {}
    for key, value in state.items():
        for g_name, v_name in (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")):
            if key.endswith(v_name):
                g = state[key[: -len(v_name)] + g_name]
                out[key[: -len(v_name)] + "weight"] = g * value / value.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
                break
            if key.endswith(g_name):
                break
        else:
            out[key] = value
    return out


def ref_durations(w: dict, units: torch.Tensor) -> torch.Tensor:
    x = F.embedding(units, w["dict.weight"]).T[None]  # [1, C, T]
    for n in (1, 2):
        x = F.relu(F.conv1d(x, w[f"dur_predictor.conv{n}.0.weight"], w[f"dur_predictor.conv{n}.0.bias"], padding=1))
        x = x.transpose(1, 2)
        x = F.layer_norm(x, x.shape[-1:], w[f"dur_predictor.ln{n}.weight"], w[f"dur_predictor.ln{n}.bias"]).transpose(1, 2)
    log_d = F.linear(x.transpose(1, 2), w["dur_predictor.proj.weight"], w["dur_predictor.proj.bias"])[0, :, 0]
    return (log_d.exp() - 1).round().long().clamp(min=1)


def ref_forward(w: dict, cfg: dict, frames: torch.Tensor, speaker: int | None = None, style: int | None = None) -> torch.Tensor:
    x = F.embedding(frames, w["dict.weight"]).T[None]
    if speaker is not None:
        x = torch.cat([x, w["spkr.weight"][speaker].reshape(1, -1, 1).repeat(1, 1, x.shape[2])], dim=1)
    if style is not None:  # Expresso: after the speaker
        x = torch.cat([x, w["style.weight"][style].reshape(1, -1, 1).repeat(1, 1, x.shape[2])], dim=1)
    x = F.conv1d(x, w["conv_pre.weight"], w["conv_pre.bias"], padding=3)
    kernels, dilations = cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]
    for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        x = F.conv_transpose1d(F.leaky_relu(x, 0.1), w[f"ups.{i}.weight"], w[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        total = torch.zeros_like(x)
        for j, (kk, dil) in enumerate(zip(kernels, dilations)):
            p = f"resblocks.{i * len(kernels) + j}"
            y = x
            if cfg["resblock"] == "1":
                for m, d in enumerate(dil):
                    t = F.conv1d(F.leaky_relu(y, 0.1), w[f"{p}.convs1.{m}.weight"], w[f"{p}.convs1.{m}.bias"],
                                 dilation=d, padding=d * (kk - 1) // 2)
                    t = F.conv1d(F.leaky_relu(t, 0.1), w[f"{p}.convs2.{m}.weight"], w[f"{p}.convs2.{m}.bias"], padding=(kk - 1) // 2)
                    y = y + t
            else:
                for m, d in enumerate(dil[:2]):
                    y = y + F.conv1d(F.leaky_relu(y, 0.1), w[f"{p}.convs.{m}.weight"], w[f"{p}.convs.{m}.bias"],
                                     dilation=d, padding=d * (kk - 1) // 2)
            total = total + y
        x = total / len(kernels)
    x = F.conv1d(F.leaky_relu(x, 0.01), w["conv_post.weight"], w["conv_post.bias"], padding=3)
    return torch.tanh(x)[0, 0]


def _speechlike(wave: torch.Tensor) -> None:
    """Guard against a test that cannot fail: the output is neither silent nor saturated."""
    assert 1e-3 < wave.std() and wave.abs().max() < 0.99


# ---------------------------------------------------------------- tests


def test_reference_fold_is_torch_weight_norm(tmp_path):
    """The test's own fold agrees with torch's, and ConvTranspose1d stores g over its *input* channels."""
    _, _, state = make_checkpoint(tmp_path)
    assert state["ups.0.weight_g"].shape == (64, 1, 1) and state["ups.0.weight_v"].shape == (64, 32, 11)
    w = fold(state)
    for key in ("ups.0", "conv_pre", "resblocks.3.convs1.2"):
        expected = torch._weight_norm(state[f"{key}.weight_v"], state[f"{key}.weight_g"], 0)
        torch.testing.assert_close(w[f"{key}.weight"], expected)


@pytest.mark.parametrize("resblock,norm", [("1", _wn), ("2", _wn), ("1", _wn_new)], ids=["fairseq", "resblock2", "parametrized"])
def test_decode_matches_reference_forward(tmp_path, resblock, norm):
    path, cfg, state = make_checkpoint(tmp_path, resblock=resblock, norm=norm)
    vocoder = load_vocoder(path)
    units = torch.tensor(UNITS)
    wave = vocoder.decode(units)
    assert wave.shape == (len(UNITS) * HOP,) and vocoder.hop_length == HOP and vocoder.sample_rate == 16000
    expected = ref_forward(fold(state), cfg, units)
    _speechlike(expected)
    torch.testing.assert_close(wave, expected, atol=1e-5, rtol=0)


def test_durations_are_honoured_before_prediction(tmp_path):
    path, cfg, state = make_checkpoint(tmp_path, dur_predictor_params=DUR_PARAMS)
    w = fold(state)
    units = torch.tensor(UNITS)
    durations = torch.tensor([2, 1, 3, 1, 1, 4, 2, 1, 1, 2, 1, 3])

    plain = load_vocoder(path)
    assert not plain.dur_prediction  # neither the caller nor the config asked
    torch.testing.assert_close(plain.decode(units), ref_forward(w, cfg, units), atol=1e-5, rtol=0)

    predicting = load_vocoder(path, dur_prediction=True)
    wave = predicting.decode(units, durations)  # the record's durations win over the predictor
    assert wave.shape == (int(durations.sum()) * HOP,)
    torch.testing.assert_close(wave, ref_forward(w, cfg, units.repeat_interleave(durations)), atol=1e-5, rtol=0)

    predicted = ref_durations(w, units)
    assert len(set(predicted.tolist())) > 1 and predicted.max() > 1, "the reference predictor must do something"
    torch.testing.assert_close(predicting.predict_durations(units), predicted, atol=0, rtol=0)
    wave = predicting.decode(units)
    assert wave.shape == (int(predicted.sum()) * HOP,)
    torch.testing.assert_close(wave, ref_forward(w, cfg, units.repeat_interleave(predicted)), atol=1e-5, rtol=0)

    # "dur_prediction": true in the config turns the predictor on by default.
    (tmp_path / "pred.json").write_text(json.dumps({**cfg, "dur_prediction": True}))
    assert load_vocoder(path, tmp_path / "pred.json").decode(units).shape == wave.shape
    with pytest.raises(UsageError, match="no duration predictor"):
        load_vocoder(make_checkpoint(tmp_path / "nodur")[0], dur_prediction=True)


def test_speaker_embedding(tmp_path):
    path, cfg, state = make_checkpoint(tmp_path, multispkr="from_input_file", num_speakers=5, model_in_dim=16)
    w = fold(state)
    units = torch.tensor(UNITS)
    waves = {}
    for speaker in (1, 4):
        waves[speaker] = load_vocoder(path, speaker=speaker).decode(units)
        torch.testing.assert_close(waves[speaker], ref_forward(w, cfg, units, speaker=speaker), atol=1e-5, rtol=0)
    assert (waves[1] - waves[4]).abs().max() > 1e-3
    with pytest.raises(UsageError, match=r"multi-speaker \(5 speakers\).*--speaker"):
        load_vocoder(path)
    with pytest.raises(UsageError, match=r"--speaker 5 is out of range.*0\.\.4"):
        load_vocoder(path, speaker=5)
    with pytest.raises(UsageError, match="no speaker embedding"):
        load_vocoder(make_checkpoint(tmp_path / "single")[0], speaker=0)

    # Expresso layout: speaker and style tables (default style table size 100).
    path, cfg, state = make_checkpoint(tmp_path / "expresso", multispkr="from_input_file", num_speakers=5,
                                       multistyle="from_input_file", model_in_dim=24)
    wave = load_vocoder(path, speaker=2, style=7).decode(units)
    torch.testing.assert_close(wave, ref_forward(fold(state), cfg, units, speaker=2, style=7), atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match=r"multi-style \(100 styles\).*--style"):
        load_vocoder(path, speaker=2)


def test_unsupported_conditioning_is_refused(tmp_path):
    path, cfg, _ = make_checkpoint(tmp_path)
    for key, value, why in (("f0", True, "pitch track"), ("embedder_params", {"x": 1}, "external embedding"),
                            ("f0_quant_num_bin", 10, "pitch track"), ("resblock", "3", "must be \"1\" or \"2\"")):
        (tmp_path / "c.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CodecError, match=rf"c\.json: '{key}'.*{why}") as info:
            load_vocoder(path, tmp_path / "c.json")
        assert "\n" not in str(info.value)


def test_bad_files_are_named(tmp_path):
    path, cfg, state = make_checkpoint(tmp_path / "v")
    with pytest.raises(CodecError, match=r"nope: no such vocoder checkpoint"):
        load_vocoder(tmp_path / "nope")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "g_1").write_bytes(path.read_bytes())
    with pytest.raises(CodecError, match=r"alone/config\.json: vocoder config not found.*--vocoder-config"):
        load_vocoder(alone / "g_1")
    cases = [
        ({k: v for k, v in cfg.items() if k != "upsample_rates"}, r"missing key 'upsample_rates'"),
        ({**cfg, "upsample_kernel_sizes": [11, 8]}, r"'upsample_kernel_sizes' has 2 entries"),
        ({**cfg, "model_in_dim": 80}, r"'model_in_dim' is 80.*gives 8"),
        ({**cfg, "embedding_dim": 4, "model_in_dim": 4}, r"dict\.weight has shape \[16, 8\].*\[16, 4\]"),
    ]
    for bad, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(CodecError, match=message):
            load_vocoder(path, tmp_path / "bad.json")
    for drop, message in (("conv_post.weight_g", r"'conv_post\.weight_v' has no matching 'conv_post\.weight_g'"),
                          ("ups.1.weight_v", r"'ups\.1\.weight_g' has no matching 'ups\.1\.weight_v'"),
                          ("resblocks.0.convs2.1.bias", r"missing 1 key\(s\): resblocks\.0\.convs2\.1\.bias")):
        torch.save({"generator": {k: v for k, v in state.items() if k != drop}}, tmp_path / "v" / "g_bad")
        with pytest.raises(CodecError, match=message):
            load_vocoder(tmp_path / "v" / "g_bad")
    torch.save({"generator": {**state, "ups.0.weight_g": state["ups.0.weight_g"][:32]}}, tmp_path / "v" / "g_bad")
    with pytest.raises(CodecError, match=r"'ups\.0\.weight_g' has shape \[32, 1, 1\], expected \[64, 1, 1\]"):
        load_vocoder(tmp_path / "v" / "g_bad")
    torch.save({"model": state}, tmp_path / "v" / "g_bad")
    with pytest.raises(CodecError, match=r"g_bad: no 'generator' state dict \(found model\)"):
        load_vocoder(tmp_path / "v" / "g_bad")


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, legacy):
    make_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    malicious_torch_file(str(tmp_path / "g_00000100"), str(marker), legacy=legacy)
    with pytest.raises(CodecError, match=r"refusing to load.*(posix|os)\.system"):
        load_vocoder(tmp_path / "g_00000100")
    assert not marker.exists()


# ---------------------------------------------------------------- through the CLI


@pytest.fixture
def unit_codec(tiny_whisper_pt):
    """A Whisper-units codec directory with k=16 (random centroids: only ids matter here)."""
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features import extractor_for

    extractor = extractor_for("whisper-tiny", checkpoint=str(tiny_whisper_pt), layer=1)
    save_codec_dir("codecs/whisper-d32x2-l1-k16", extractor, torch.randn(16, extractor.dim), {"fit": {}})
    return "whisper-d32x2-l1-k16"


def test_cli_round_trip_and_k_mismatch(cli, unit_codec, tmp_path):
    path, cfg, state = make_checkpoint(tmp_path / "vocoder")
    durations = [2, 1, 3, 1, 1, 4, 2, 1, 1, 2, 1, 3]
    record = {"v": 1, "id": "utt", "segments": [
        {"modality": "text", "text": "hello"},
        {"modality": "audio", "codec": unit_codec, "frame_rate": 50, "tokens": UNITS, "durations": durations}]}
    line = json.dumps(record) + "\n"

    r = cli("detokenize", "-o", "out.wav", input=line)
    assert r.exit_code == 1 and "unit vocoder" in r.stderr and "--vocoder" in r.stderr

    r = cli("detokenize", "--vocoder", path, "-o", "out.wav", "--device", "cpu", input=line)
    assert r.exit_code == 0, r.stderr
    data, sr = sf.read("out.wav", dtype="float32")
    assert sr == 16000 and data.shape == (sum(durations) * HOP,)
    expected = ref_forward(fold(state), cfg, torch.tensor(UNITS).repeat_interleave(torch.tensor(durations)))
    assert torch.allclose(torch.from_numpy(data), expected, atol=1 / 32767 + 1e-6)  # 16-bit PCM

    # A vocoder trained on another k is refused, naming both numbers.
    other, _, _ = make_checkpoint(tmp_path / "k32", num_embeddings=32)
    r = cli("detokenize", "--vocoder", other, "-o", "x.wav", input=line)
    assert r.exit_code == 1 and "32 units" in r.stderr and "k=16" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not Path("x.wav").exists()

    # --dur-prediction expands a segment without durations by the vocoder's predictor.
    dur_path, _, dur_state = make_checkpoint(tmp_path / "dur", dur_predictor_params=DUR_PARAMS)
    undeduped = {k: v for k, v in record["segments"][1].items() if k != "durations"}
    bare = json.dumps({**record, "segments": [undeduped]})
    r = cli("detokenize", "--vocoder", dur_path, "--dur-prediction", "-o", "d.wav", input=bare + "\n")
    assert r.exit_code == 0, r.stderr
    predicted = ref_durations(fold(dur_state), torch.tensor(UNITS))
    assert sf.info("d.wav").frames == int(predicted.sum()) * HOP != len(UNITS) * HOP

    r = cli("detokenize", "--speaker", "1", "-o", "x.wav", input=line)
    assert r.exit_code == 2 and "need --vocoder" in r.stderr
