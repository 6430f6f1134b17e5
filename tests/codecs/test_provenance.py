"""Self-contained codec directories (item 5) and token provenance (item 6).

A codec directory records its extractor's checkpoint as an absolute path with its sha256;
loading prefers that file (or one beside the codec) when its digest matches, takes
``--checkpoint`` to point elsewhere, and otherwise names the recorded path and hash. Token
segments carry ``weights`` (16 hex digits of the weights' sha256), and decoders refuse ids
made by other weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import weight_files as wf
from teal_cli.codecs.base import check_segment_weights
from teal_cli.errors import CodecError, DataError


def one_line_error(result, *fragments, code=1):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _whisper_codec(checkpoint: str, out: Path) -> Path:
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features import extractor_for

    extractor = extractor_for("whisper", layer=1, checkpoint=checkpoint)
    torch.manual_seed(0)
    return save_codec_dir(out, extractor, torch.randn(8, extractor.dim), {})


def _tokens(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.splitlines()[0])["segments"][0]


def test_relative_checkpoint_codec_works_from_another_folder(tmp_path, cli, wav_file, monkeypatch):
    home = tmp_path / "project"
    (home / "models" / "w").mkdir(parents=True)
    wf.whisper_pt(home / "models" / "w" / "tiny.pt")
    monkeypatch.chdir(home)
    codec = _whisper_codec("models/w/tiny.pt", home / "codecs" / "wcodec")
    recorded = json.loads((codec / "config.json").read_text())["features"]["checkpoint"]
    assert Path(recorded).is_absolute() and Path(recorded) == (home / "models/w/tiny.pt").resolve()
    here = _tokens(cli("tokenize", wav_file, "--codec", "codecs/wcodec", "-q"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    seg = _tokens(cli("tokenize", wav_file, "--codec", codec, "-q"))
    assert seg["tokens"] == here["tokens"] and seg["weights"] == here["weights"]
    # a codec recorded (by hand, or by an older teal) relative to its own directory works too
    config = json.loads((codec / "config.json").read_text())
    config["features"]["checkpoint"] = "../../models/w/tiny.pt"
    (codec / "config.json").write_text(json.dumps(config))
    assert _tokens(cli("tokenize", wav_file, "--codec", codec, "-q"))["tokens"] == here["tokens"]


@pytest.mark.parametrize("kind", ["openai-named-base", "ct2-tiny-size"])
def test_local_weights_of_an_official_size_are_used_not_downloaded(tmp_path, cli, wav_file, monkeypatch, kind):
    """A converted base.pt (another sha256 than openai's) or a CTranslate2 folder of Whisper-tiny's
    size are named whisper-base / whisper-tiny; their codec uses them, offline, from anywhere."""
    if kind == "openai-named-base":
        source = wf.whisper_pt(tmp_path / "weights" / "base.pt")
        model = "whisper-base"
    else:
        source = wf.whisper_ct2(tmp_path / "weights" / "faster-whisper-tiny", width=384, layers=4)
        model = "whisper-tiny"
    codec = _whisper_codec(str(source), tmp_path / "codecs" / "c")
    features = json.loads((codec / "config.json").read_text())["features"]
    assert features["model"] == model
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    seg = _tokens(cli("tokenize", wav_file, "--codec", codec, "-q"))
    assert len(seg["weights"]) == 16


def test_checkpoint_moved_checkpoint_option_and_errors(tmp_path, cli, wav_file, monkeypatch):
    source = wf.whisper_pt(tmp_path / "w" / "tiny.pt")
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    codec = _whisper_codec(str(source), tmp_path / "codecs" / "c")
    before = _tokens(cli("tokenize", wav_file, "--codec", codec, "-q"))
    moved = tmp_path / "moved" / "renamed.pt"
    moved.parent.mkdir()
    shutil.move(source, moved)
    out = tmp_path / "out.jsonl"
    r = cli("tokenize", wav_file, "--codec", codec, "-o", out)
    message = one_line_error(r, str(source), sha, "--checkpoint")
    assert "--features" not in message and not out.exists()
    after = _tokens(cli("tokenize", wav_file, "--codec", codec, "--checkpoint", moved, "-q"))
    assert after["tokens"] == before["tokens"] and after["weights"] == before["weights"]
    # a copy inside the codec directory is found without --checkpoint
    shutil.copy(moved, codec / "tiny.pt")
    assert _tokens(cli("tokenize", wav_file, "--codec", codec, "-q"))["tokens"] == before["tokens"]
    (codec / "tiny.pt").unlink()
    other = wf.whisper_pt(tmp_path / "other.pt", seed=5)
    r = cli("tokenize", wav_file, "--codec", codec, "--checkpoint", other, "-o", out)
    message = one_line_error(r, "other.pt", sha)
    assert "--features" not in message and not out.exists()
    # the recorded file replaced by other weights: named with both digests
    shutil.copy(other, source)
    one_line_error(cli("tokenize", wav_file, "--codec", codec, "-o", out), str(source), sha,
                   hashlib.sha256(other.read_bytes()).hexdigest()[:16])
    r = cli("tokenize", wav_file, "--codec", codec, "--checkpoint", tmp_path / "nowhere.pt", "-o", out)
    message = one_line_error(r, "nowhere.pt", code=2)
    assert "--features" not in message and not out.exists()


def test_checkpoint_option_for_a_codec_without_weights_is_a_usage_error(tmp_path, cli, photo):
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features import extractor_for

    codec = save_codec_dir(tmp_path / "patch-p4-k8", extractor_for("patch", patch_size=4), torch.rand(8, 48), {})
    one_line_error(cli("tokenize", photo, "--codec", codec, "--checkpoint", "x.pt"), "no weights", code=2)


# ---------------------------------------------------------------- provenance


def test_vqgan_tokens_name_their_weights_and_other_weights_refuse_them(tmp_path, cli, photo):
    a_ckpt, a_cfg = wf.vqgan_files(tmp_path / "a", n_embed=16, seed=0)
    b_ckpt, b_cfg = wf.vqgan_files(tmp_path / "b", n_embed=16, seed=1)  # same shapes, other weights
    c_ckpt, c_cfg = wf.vqgan_files(tmp_path / "c", n_embed=32, seed=2)  # another codebook size
    tok = cli("tokenize", photo, "--codec", "vqgan-f16-1024", "--checkpoint", a_ckpt, "--config", a_cfg, "-q")
    seg = _tokens(tok)
    assert seg["codec"] == "vqgan-f16-1024"
    assert seg["weights"] == hashlib.sha256(a_ckpt.read_bytes()).hexdigest()[:16]
    for ckpt, cfg in ((b_ckpt, b_cfg), (c_ckpt, c_cfg)):
        out = tmp_path / "x.png"
        r = cli("detokenize", "-", "--checkpoint", ckpt, "--config", cfg, "-o", out, input=tok.stdout)
        one_line_error(r, "record", seg["weights"], hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16], "--checkpoint")
        assert not out.exists()
    out = tmp_path / "ok.png"
    r = cli("detokenize", "-", "--checkpoint", a_ckpt, "--config", a_cfg, "-o", out, "-q", input=tok.stdout)
    assert r.exit_code == 0, r.stderr
    assert out.exists()
    # records from before the field existed still decode
    old = json.loads(tok.stdout)
    del old["segments"][0]["weights"]
    out2 = tmp_path / "old.png"
    r = cli("detokenize", "-", "--checkpoint", b_ckpt, "--config", b_cfg, "-o", out2, "-q", input=json.dumps(old) + "\n")
    assert r.exit_code == 0, r.stderr


def test_kmeans_codec_refit_in_place_refuses_old_tokens(tmp_path, cli, photo):
    from teal_cli.codecs import load_codec
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features import extractor_for

    out = tmp_path / "codecs" / "patch-p4-k8"
    save_codec_dir(out, extractor_for("patch", patch_size=4), torch.rand(8, 48, generator=torch.Generator().manual_seed(0)), {})
    first = load_codec(str(out)).weights_id
    tok = cli("tokenize", photo, "--codec", out, "-q")
    assert _tokens(tok)["weights"] == first
    save_codec_dir(out, extractor_for("patch", patch_size=4), torch.rand(8, 48, generator=torch.Generator().manual_seed(1)), {})
    assert load_codec(str(out)).weights_id != first
    png = tmp_path / "p.png"
    one_line_error(cli("detokenize", "-", "-o", png, input=tok.stdout), first)
    assert not png.exists()


def test_weights_id_depends_on_content_not_location(tmp_path):
    from teal_cli.codecs import load_codec

    ckpt, cfg = wf.vqgan_files(tmp_path / "a")
    copy = tmp_path / "elsewhere" / "renamed.ckpt"
    copy.parent.mkdir()
    shutil.copy(ckpt, copy)
    a = load_codec("vqgan-f16-1024", checkpoint=str(ckpt), config=str(cfg)).weights_id
    b = load_codec("vqgan-f16-16384", checkpoint=str(copy), config=str(cfg)).weights_id
    assert a == b == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    enc = wf.dalle_encoder(tmp_path / "d")
    assert load_codec("dalle", checkpoint=str(enc)).weights_id == hashlib.sha256(enc.read_bytes()).hexdigest()[:16]
    pth = wf.beit2_pth(tmp_path / "v.pth")
    assert load_codec("beit2", checkpoint=str(pth)).weights_id == hashlib.sha256(pth.read_bytes()).hexdigest()[:16]


def test_check_segment_weights_contract(tmp_path):
    """The one check decoders, init-embeddings and generate share: (segment, codec, where)."""
    from teal_cli.codecs import load_codec
    from teal_cli.records import Segment, parse_segment

    ckpt, cfg = wf.vqgan_files(tmp_path / "a")
    codec = load_codec("vqgan-f16-1024", checkpoint=str(ckpt), config=str(cfg))
    good = {"modality": "image", "codec": codec.name, "weights": codec.weights_id, "shape": [1], "tokens": [0]}
    check_segment_weights(good, codec, "r")
    check_segment_weights(parse_segment(good, "f:1", 0), codec, "r")
    check_segment_weights({**good, "weights": codec.weights_id[:8]}, codec, "r")  # a shorter prefix agrees
    check_segment_weights({k: v for k, v in good.items() if k != "weights"}, codec, "r")  # older records
    check_segment_weights(Segment(modality="image", codec="x", tokens=[0]), codec, "r")
    with pytest.raises(CodecError, match=r"^rec 'a' segment 0: tokens were made .* weights 0123456789abcdef"):
        check_segment_weights({**good, "weights": "0123456789abcdef"}, codec, "rec 'a' segment 0")
    parsed = parse_segment(good, "f:1", 0)
    assert parsed.weights == codec.weights_id and parsed.to_json()["weights"] == codec.weights_id
    assert list(parsed.to_json())[:3] == ["modality", "codec", "weights"]
    for bad in ("", "XYZ", 12, "abc"):
        with pytest.raises(DataError, match=r"segments\[0\]\.weights"):
            parse_segment({**good, "weights": bad}, "f:1", 0)
