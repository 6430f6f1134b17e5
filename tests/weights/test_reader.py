"""Damaged, missing and inconsistent weight files: one line naming the file, never a traceback.

Each format teal reads (torch zip and legacy pickles as .ckpt/.pkl/.pth/.pt, safetensors
single and sharded, CTranslate2 model.bin, Hugging Face folders for Whisper and HuBERT,
yaml/json configs, k-means codec directories, km.bin) is written for real by
tests/weight_files.py, then damaged: cut short, cut by one byte, emptied, overwritten with
random bytes, removed, or made to disagree with its config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import weight_files as wf
from teal_cli.errors import CodecError, TealError, UsageError


def _random(path: Path) -> None:
    path.write_bytes(os.urandom(max(path.stat().st_size, 64)))


DAMAGE = {
    "half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "last-byte": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "ten-bytes": lambda p: p.write_bytes(p.read_bytes()[:10]),
    "empty": lambda p: p.write_bytes(b""),
    "random": _random,
    "missing": lambda p: p.unlink(),
}


def one_line(exc: BaseException, *fragments: str) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message, message
    assert isinstance(exc, TealError), type(exc)
    for fragment in fragments:
        assert fragment in message, message
    return message


def _expect(load, *fragments: str):
    with pytest.raises(TealError) as info:
        load()
    return one_line(info.value, *fragments)


# ---------------------------------------------------------------- per format


def _vqgan(tmp):
    from teal_cli.codecs import load_codec

    ckpt, config = wf.vqgan_files(tmp / "vq")
    return ckpt, lambda: load_codec("vqgan-f16-1024", checkpoint=str(ckpt), config=str(config))


def _vqgan_legacy(tmp):
    from teal_cli.codecs import load_codec

    ckpt, config = wf.vqgan_files(tmp / "vq", legacy=True)
    return ckpt, lambda: load_codec("vqgan-f16-1024", checkpoint=str(ckpt), config=str(config))


def _vqgan_yaml(tmp):
    from teal_cli.codecs import load_codec

    ckpt, config = wf.vqgan_files(tmp / "vq")
    return config, lambda: load_codec("vqgan-f16-1024", checkpoint=str(ckpt), config=str(config))


def _dalle(tmp):
    from teal_cli.codecs import load_codec

    path = wf.dalle_encoder(tmp / "dalle")
    return path, lambda: load_codec("dalle", checkpoint=str(path))


def _beit2(tmp):
    from teal_cli.codecs import load_codec

    path = wf.beit2_pth(tmp / "vqkd.pth")
    return path, lambda: load_codec("beit2", checkpoint=str(path))


def _whisper_pt(tmp):
    from teal_cli.features.whisper import WhisperFeatures

    path = wf.whisper_pt(tmp / "w" / "tiny.pt")
    return path, lambda: WhisperFeatures.from_name("whisper", checkpoint=str(path))


def _whisper_hf(tmp):
    from teal_cli.features.whisper import WhisperFeatures

    folder = wf.whisper_hf(tmp / "hf")
    return folder / "model.safetensors", lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder))


def _whisper_hf_shard(tmp):
    from teal_cli.features.whisper import WhisperFeatures

    folder = wf.whisper_hf(tmp / "hf", shards=3)
    return folder / "model-00002-of-00003.safetensors", lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder))


def _whisper_hf_index(tmp):
    from teal_cli.features.whisper import WhisperFeatures

    folder = wf.whisper_hf(tmp / "hf", shards=2)
    return folder / "model.safetensors.index.json", lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder))


def _whisper_hf_config(tmp):
    from teal_cli.features.whisper import WhisperFeatures

    folder = wf.whisper_hf(tmp / "hf")
    return folder / "config.json", lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder))


def _whisper_ct2(tmp):
    from teal_cli.features.whisper import WhisperFeatures

    folder = wf.whisper_ct2(tmp / "ct2")
    return folder / "model.bin", lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder))


def _hubert(tmp):
    from teal_cli.features.hubert import HubertFeatures

    folder = wf.hubert_hf(tmp / "hubert")
    return folder / "model.safetensors", lambda: HubertFeatures.from_name("hubert-x", checkpoint=str(folder))


def _hubert_config(tmp):
    from teal_cli.features.hubert import HubertFeatures

    folder = wf.hubert_hf(tmp / "hubert")
    return folder / "config.json", lambda: HubertFeatures.from_name("hubert-x", checkpoint=str(folder))


def _kmeans_dir(tmp, name):
    from teal_cli.codecs import load_codec
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features import extractor_for

    out = save_codec_dir(tmp / "patch-p4-k8", extractor_for("patch", patch_size=4), torch.rand(8, 48), {})
    return out / name, lambda: load_codec(str(out))


def _km_bin(tmp):
    import numpy as np

    from teal_cli.cluster.fit import import_codec
    from teal_cli.features import extractor_for
    from teal_cli.cluster.kmbin import write_km

    path = tmp / "km.bin"
    write_km(path, np.random.default_rng(0).normal(size=(8, 80)).astype(np.float32))
    return path, lambda: import_codec(path, extractor_for("mel"), tmp / "codec")


FORMATS = {
    "vqgan-ckpt-zip": _vqgan, "vqgan-ckpt-legacy": _vqgan_legacy, "vqgan-yaml": _vqgan_yaml, "dalle-pkl": _dalle,
    "beit2-pth": _beit2, "whisper-openai-pt": _whisper_pt, "whisper-hf-safetensors": _whisper_hf,
    "whisper-hf-shard": _whisper_hf_shard, "whisper-hf-index": _whisper_hf_index, "whisper-hf-config": _whisper_hf_config,
    "whisper-ct2": _whisper_ct2, "hubert-safetensors": _hubert, "hubert-config": _hubert_config,
    "kmeans-centroids": lambda t: _kmeans_dir(t, "centroids.safetensors"),
    "kmeans-config": lambda t: _kmeans_dir(t, "config.json"), "km-bin": _km_bin,
}
# text files cut by one byte can stay valid (a JSON object's closing brace is needed, a
# newline is not): those cases cut into the last value instead.
TEXT = {"vqgan-yaml", "whisper-hf-index", "whisper-hf-config", "hubert-config", "kmeans-config"}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_damaged_file_is_one_line_naming_it(tmp_path, fmt, damage):
    target, load = FORMATS[fmt](tmp_path)
    load()  # the intact files load
    if damage == "last-byte" and fmt in TEXT:
        target.write_bytes(target.read_bytes().rstrip()[:-2])
    else:
        DAMAGE[damage](target)
    message = _expect(load, target.name)
    if damage == "missing":
        assert any(w in message for w in ("not found", "missing", "no such", "absent")), message


def test_safetensors_messages_say_truncated_or_not_safetensors(tmp_path):
    from teal_cli.weights.reader import read_safetensors

    folder = wf.whisper_hf(tmp_path / "hf")
    path = folder / "model.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    _expect(lambda: read_safetensors(path), "truncated safetensors file", "interrupted download")
    path.write_bytes(b"\x05" + bytes(7) + b"{}")
    _expect(lambda: read_safetensors(path), "truncated")
    path.write_bytes(b"hello world, this is not it")
    _expect(lambda: read_safetensors(path), "not a safetensors file")


def test_torch_zip_with_a_corrupt_tensor_record(tmp_path):
    """Bytes changed inside a tensor's record: zip's CRC catches it, at the tensor's read."""
    import zipfile

    ckpt, config = wf.vqgan_files(tmp_path / "vq")
    with zipfile.ZipFile(ckpt) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(ckpt.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 100 : start + 108] = b"\xff" * 8
    ckpt.write_bytes(bytes(data))
    from teal_cli.codecs import load_codec

    _expect(lambda: load_codec("vqgan-f16-1024", checkpoint=str(ckpt), config=str(config)), "last.ckpt", "corrupt")


# ---------------------------------------------------------------- config against weights


def test_vqgan_config_disagreeing_with_weights(tmp_path):
    import yaml

    from teal_cli.codecs import load_codec

    ckpt, config = wf.vqgan_files(tmp_path / "vq", n_embed=16)
    data = yaml.safe_load(config.read_text())

    def load():
        return load_codec("vqgan-f16-1024", checkpoint=str(ckpt), config=str(config))

    for change, fragment in (({"n_embed": 32}, "quantize.embedding.weight has shape [16, 4]"),
                             ({"ddconfig": {**wf.VQ_DDCONFIG, "ch_mult": [1, 1, 1]}}, "missing"),
                             ({"ddconfig": {**wf.VQ_DDCONFIG, "ch": "wide"}}, "ddconfig.ch must be a positive integer"),
                             ({"ddconfig": {**wf.VQ_DDCONFIG, "ch": 10**6}}, "has shape"),
                             ({"n_embed": -3}, "'n_embed' must be positive"),
                             ({"ddconfig": [1, 2]}, "ddconfig must be a mapping")):
        bad = {"model": {**data["model"], "params": {**data["model"]["params"], **change}}}
        config.write_text(yaml.safe_dump(bad))
        message = _expect(load)
        assert fragment in message, message
    config.write_text("model: [unclosed")
    _expect(load, "model.yaml", "not valid YAML", "line 1")
    config.write_text("- just\n- a list\n")
    _expect(load, "must be a YAML mapping")


def test_whisper_config_and_dims_disagreeing_with_weights(tmp_path):
    from teal_cli.features.whisper import WhisperFeatures

    folder = wf.whisper_hf(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    for change, fragment in (({"d_model": 48}, "has shape"), ({"encoder_layers": 3}, "missing"),
                             ({"encoder_layers": 1}, "unexpected"), ({"encoder_attention_heads": 5}, "not divisible"),
                             ({"num_mel_bins": "80"}, "'num_mel_bins' must be int"),
                             ({"model_type": "bert"}, "not 'whisper'")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        message = _expect(lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder)))
        assert fragment in message, message
    # openai .pt whose dims disagree with its tensors
    path = wf.whisper_pt(tmp_path / "w.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["dims"]["n_audio_state"] = 64
    torch.save(ckpt, path)
    _expect(lambda: WhisperFeatures.from_name("whisper", checkpoint=str(path)), "w.pt", "has shape")
    del ckpt["dims"]["n_mels"]
    torch.save(ckpt, path)
    _expect(lambda: WhisperFeatures.from_name("whisper", checkpoint=str(path)), "w.pt", "'n_mels' is missing")


def test_ctranslate2_inconsistent_files(tmp_path):
    from teal_cli.features.whisper import WhisperFeatures

    folder = wf.whisper_ct2(tmp_path / "ct2")
    model = folder / "model.bin"
    good = model.read_bytes()
    model.write_bytes(good + b"\0\0\0\0")
    _expect(lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder)), "model.bin", "after its last entry")
    model.write_bytes(good.replace(b"encoder/num_heads", b"encoder/num_hxads"))
    _expect(lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder)), "model.bin")
    model.write_bytes(good.replace(b"WhisperSpec", b"WhisperSpeX"))
    _expect(lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder)), "not a Whisper model")


def test_hubert_missing_shard_and_config_mismatch(tmp_path):
    from teal_cli.features.hubert import HubertFeatures

    folder = wf.hubert_hf(tmp_path / "sharded", shards=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    HubertFeatures.from_name("hubert-x", checkpoint=str(folder))
    (folder / shard).unlink()
    _expect(lambda: HubertFeatures.from_name("hubert-x", checkpoint=str(folder)), shard, "shard missing")

    folder = wf.hubert_hf(tmp_path / "single")
    config = json.loads((folder / "config.json").read_text())
    for change, fragment in (({"hidden_size": 48}, "has shape"), ({"num_hidden_layers": 3}, "lack"),
                             ({"intermediate_size": 80}, "has shape")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        _expect(lambda: HubertFeatures.from_name("hubert-x", checkpoint=str(folder)), fragment)


def test_whisper_sharded_folder_with_a_missing_shard_names_it(tmp_path):
    from teal_cli.features.whisper import WhisperFeatures

    folder = wf.whisper_hf(tmp_path / "hf", shards=3)
    (folder / "model-00003-of-00003.safetensors").unlink()
    _expect(lambda: WhisperFeatures.from_name("whisper", checkpoint=str(folder)),
            "model-00003-of-00003.safetensors: shard missing", "1 of the 3")


def test_kmeans_centroids_inconsistent_with_config(tmp_path):
    from safetensors.torch import save_file

    target, load = _kmeans_dir(tmp_path, "centroids.safetensors")
    save_file({"centroids": torch.rand(8, 12)}, str(target))
    _expect(load, "centroids.safetensors", "[8, 12]", "dim=48")
    save_file({"other": torch.rand(8, 48)}, str(target))
    _expect(load, "no 'centroids' tensor")
    bad = torch.rand(8, 48)
    bad[3, 3] = float("nan")
    save_file({"centroids": bad}, str(target))
    _expect(load, "NaN")


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("damage", ["half", "random"])
def test_cli_tokenize_with_a_damaged_checkpoint(tmp_path, cli, photo, damage):
    ckpt, config = wf.vqgan_files(tmp_path / "vq")
    DAMAGE[damage](ckpt)
    out = tmp_path / "out.jsonl"
    r = cli("tokenize", photo, "--codec", "vqgan-f16-1024", "--checkpoint", ckpt, "--config", config, "-o", out)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "last.ckpt" in lines[0], r.stderr
    assert not out.exists()


def test_cli_whisper_codec_with_damaged_shard(tmp_path, cli, wav_file):
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features import extractor_for

    folder = wf.whisper_hf(tmp_path / "hf", shards=2)
    extractor = extractor_for("whisper", layer=1, checkpoint=str(folder))
    codec = save_codec_dir(tmp_path / "codecs" / "wcodec", extractor, torch.rand(8, extractor.dim), {})
    DAMAGE["half"](folder / "model-00001-of-00002.safetensors")
    out = tmp_path / "a.jsonl"
    r = cli("tokenize", wav_file, "--codec", codec, "-o", out)
    assert r.exit_code == 1 and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
