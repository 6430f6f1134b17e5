"""TealModel and model directories: init from codebooks, save/load, frozen base weights, errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from teal_cli.cli import app
from teal_cli.records import Record, Segment
from tiny_llm import make_tiny_llm


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {arch: make_tiny_llm(root / arch, arch) for arch in ("llama", "qwen2", "gpt2")}


def make_patch_codec(directory, k=16, p=2, image_size=None, seed=0):
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features.patch import PatchFeatures

    gen = torch.Generator().manual_seed(seed)
    return save_codec_dir(directory, PatchFeatures(p, image_size=image_size), torch.rand(k, 3 * p * p, generator=gen), {})


def make_mel_codec(directory, k=32, seed=1):
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features.mel import MelFeatures

    gen = torch.Generator().manual_seed(seed)
    return save_codec_dir(directory, MelFeatures(80), torch.randn(k, 80, generator=gen) * 3 + 1, {})


@pytest.fixture
def codecs(isolated):
    return {"image": make_patch_codec(isolated / "codecs" / "patch-p2-k16"),
            "audio": make_mel_codec(isolated / "codecs" / "mel-80-k32")}


def build(llm_dir, names, **kw):
    from teal_cli.model.build import build_model

    return build_model(str(llm_dir), names, **kw)


def image_record(tokens, text="a handwritten seven", codec="patch-p2-k16"):
    return Record(id="r", segments=[Segment("image", codec=codec, tokens=list(tokens), shape=[4, 4]),
                                    Segment("text", text=text)])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_codebook_init_lands_in_E_and_O_and_text_logits_are_the_base_models(llm_dirs, codecs, arch):
    from teal_cli.codecs.registry import load_codec
    from transformers import AutoModelForCausalLM

    model = build(llm_dirs[arch], ["patch-p2-k16", "mel-80-k32"], image_size=8)
    for entry in model.config.codecs:
        book = load_codec(entry.name).codebook.float()
        expect = (book - book.mean(0)) / book.std()
        head = model.heads[entry.key]
        assert head.embedding.shape == (entry.vocab_size, book.shape[1])
        torch.testing.assert_close(head.embedding.detach(), expect)
        torch.testing.assert_close(head.output.detach(), expect)
    cfg = model.config
    assert cfg.codecs[0].offset == cfg.text_vocab_size + 4  # <img> </img> <aud> </aud>
    assert cfg.codecs[1].offset == cfg.codecs[0].offset + 16
    assert cfg.vocab_size == cfg.codecs[1].offset + 32
    assert cfg.codecs[0].segment == {"shape": [4, 4], "image_size": 8}
    assert cfg.codecs[1].segment == {"frame_rate": 100}

    base = AutoModelForCausalLM.from_pretrained(str(llm_dirs[arch])).eval()
    ids = torch.tensor([model.tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        ours = model(ids).logits
        theirs = base(ids).logits
    assert ours.shape[-1] == cfg.vocab_size
    torch.testing.assert_close(ours[..., : cfg.text_vocab_size], theirs, atol=1e-5, rtol=1e-5)


def test_base_weights_frozen_and_bit_identical_after_init_and_load(llm_dirs, codecs, tmp_path):
    from safetensors.torch import load_file

    from teal_cli.model import TealModel

    original = load_file(str(llm_dirs["llama"] / "model.safetensors"))
    model = build(llm_dirs["llama"], ["patch-p2-k16"], image_size=8)
    model.save(tmp_path / "m")
    loaded = TealModel.from_dir(tmp_path / "m")
    for m in (model, loaded):
        base = m.base_parameters()
        assert base and not any(p.requires_grad for p in base.values())
        for name, value in original.items():
            assert torch.equal(base["llm." + name], value), name
    # Nothing of the LLM is in the adapter, and the adapter holds exactly teal's parameters.
    saved = load_file(str(tmp_path / "m" / "adapter.safetensors"))
    assert not any(k.startswith("llm.") for k in saved)
    assert set(saved) == {"boundary_in", "boundary_out", "heads.codec0.embedding", "heads.codec0.proj_in.weight",
                          "heads.codec0.proj_in.bias", "heads.codec0.proj_out.weight", "heads.codec0.proj_out.bias",
                          "heads.codec0.output"}


def test_save_load_is_bit_exact(llm_dirs, codecs, tmp_path):
    from teal_cli.model import TealModel

    model = build(llm_dirs["gpt2"], ["patch-p2-k16", "mel-80-k32"], image_size=8, seed=3)
    with torch.no_grad():  # make the adapter differ from any init
        for p in model.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.1)
    model.save(tmp_path / "m")
    loaded = TealModel.from_dir(tmp_path / "m")
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    enc = model.encode_record(image_record(range(16)))
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "teal-model" and cfg["version"] == 1
    assert cfg["llm"]["weights_sha256"] and cfg["codecs"][0]["path"].endswith("patch-p2-k16")


def test_encode_record_targets_and_decode_round_trip(llm_dirs, codecs):
    model = build(llm_dirs["llama"], ["patch-p2-k16"], image_size=8)
    cfg = model.config
    enc = model.encode_record(image_record([3] * 16))
    open_id = cfg.boundary_id("image")
    assert enc.ids[: 18] == [open_id, *([cfg.codecs[0].offset + 3] * 16), open_id + 1]
    assert not any(enc.target[:18]) and all(enc.target[18:])
    assert enc.ids[-1] == model.eos_id
    # Text first, image target: the image's boundary tokens are targets too.
    rec = Record(id="t", segments=[Segment("text", text="draw a seven"),
                                   Segment("image", codec="patch-p2-k16", tokens=list(range(16)), shape=[4, 4])])
    enc = model.encode_record(rec)
    n_text = len(model.tokenizer("draw a seven", add_special_tokens=False).input_ids)
    assert enc.target == [False] * n_text + [True] * 19
    segs = model.decode_ids(enc.ids[:-1])
    assert [s.modality for s in segs] == ["text", "image"]
    assert segs[0].text == "draw a seven" and segs[1].tokens == list(range(16)) and segs[1].shape == [4, 4]
    # prompt_only keeps every segment of a record without roles, and drops role=target ones.
    assert model.encode_record(rec, prompt_only=True).ids == enc.ids[:-1]
    rec.segments[1].extra["role"] = "target"
    assert len(model.encode_record(rec, prompt_only=True).ids) == n_text


def test_cross_codec_model_reads_one_codec_and_writes_another(llm_dirs, codecs, isolated):
    make_patch_codec(isolated / "codecs" / "patch-p2-k32", k=32, seed=5)
    from teal_cli.model.build import build_model

    model = build_model(str(llm_dirs["llama"]), ["patch-p2-k16", "patch-p2-k32"], roles=["input", "output"], image_size=8)
    reader, writer = model.config.codecs
    assert reader.input and not reader.output and writer.output and writer.input  # generated ids are fed back
    assert model.heads[reader.key].output is None and model.heads[writer.key].embedding is not None
    enc = model.encode_record(image_record(range(16)))
    with torch.no_grad():
        logits = model(torch.tensor([enc.ids])).logits
    cols = slice(reader.offset, reader.offset + reader.vocab_size)
    assert torch.isinf(logits[..., cols]).all() and torch.isfinite(logits[..., writer.offset:]).all()
    # The writer's ids can be read back (teacher forcing, decoding): an image target of it encodes.
    rec = Record(id="x", segments=[Segment("text", text="draw a seven"),
                                   Segment("image", codec="patch-p2-k32", tokens=list(range(16)), shape=[4, 4])])
    assert model.encode_record(rec).ids[-18:-2] == [writer.offset + t for t in range(16)]


def test_fresh_bias_norm_leaves_outputs_unchanged(llm_dirs, codecs):
    from teal_cli.model.bias_norm import add_bias_norm, bias_norm_parameters

    for arch in ("llama", "gpt2"):
        model = build(llm_dirs[arch], ["patch-p2-k16"], image_size=8)
        ids = torch.tensor([model.encode_record(image_record(range(16))).ids])
        with torch.no_grad():
            before = model(ids).logits
            n = add_bias_norm(model.backbone, "scale")
            after = model(ids).logits
        assert n > 0 and len(list(bias_norm_parameters(model))) > 0
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_bias_norm_and_groups_survive_save_load(llm_dirs, codecs, tmp_path):
    from teal_cli.model import TealModel
    from teal_cli.model.bias_norm import add_bias_norm

    model = build(llm_dirs["llama"], ["patch-p2-k16"], image_size=8)
    add_bias_norm(model.backbone, "bias")
    model.config.groups["bias_norm"] = "bias"
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            if "teal_" in name:
                p.add_(0.05)
    model.save(tmp_path / "m")
    loaded = TealModel.from_dir(tmp_path / "m")
    ids = torch.tensor([model.encode_record(image_record(range(16))).ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bad_records_are_one_line_errors(llm_dirs, codecs):
    from teal_cli.errors import DataError

    model = build(llm_dirs["llama"], ["patch-p2-k16"], image_size=8)
    with pytest.raises(DataError, match=r"record 'r' segments\[0\]: token id 16 is out of range .*vocab_size 16"):
        model.encode_record(image_record([16] * 16))
    with pytest.raises(DataError, match="codec 'nope' is not part of this model"):
        model.encode_record(image_record(range(16), codec="nope"))
    from teal_cli.records import parse_record

    # through the parser, as records arrive (it keeps 'weights' in Segment.weights, not in extra)
    obj = image_record(range(16)).to_json()
    obj["segments"][0]["weights"] = "0123456789abcdef"
    rec = parse_record(obj, "f:1")
    assert rec.segments[0].weights == "0123456789abcdef" and "weights" not in rec.segments[0].extra
    model.config.codecs[0].weights = "fedcba9876543210"
    with pytest.raises(DataError, match="made by weights 0123456789abcdef"):
        model.encode_record(rec)


def test_from_dir_errors_name_the_file(llm_dirs, codecs, tmp_path):
    from safetensors.torch import load_file, save_file

    from teal_cli.model import ModelDirError, TealModel

    llm = tmp_path / "llm"
    make_tiny_llm(llm, "llama")
    model = build(llm, ["patch-p2-k16"], image_size=8)
    d = model.save(tmp_path / "m")
    with pytest.raises(ModelDirError, match="not a model directory"):
        TealModel.from_dir(tmp_path / "absent")
    cfg = json.loads((d / "config.json").read_text())
    cfg["version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="version 99 is newer"):
        TealModel.from_dir(d)
    cfg["version"] = 1
    cfg["codecs"][0]["vocab_size"] = 17
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match=r"adapter.safetensors: tensor heads.codec0.embedding has shape \[16, 12\]"):
        TealModel.from_dir(d)
    cfg["codecs"][0]["vocab_size"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelDirError, match="adapter.safetensors: cannot read the adapter"):
        TealModel.from_dir(d)
    (d / "adapter.safetensors").unlink()
    with pytest.raises(ModelDirError, match="adapter.safetensors: missing"):
        TealModel.from_dir(d)
    model.save(d)
    TealModel.from_dir(d)  # whole again
    # Another base: one weight changed after the model was made.
    weights = load_file(str(llm / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, str(llm / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelDirError, match="base LLM .* has weights sha256"):
        TealModel.from_dir(d)


def test_init_embeddings_cli(llm_dirs, codecs, tmp_path):
    runner = CliRunner()
    llm = str(llm_dirs["llama"])
    out = tmp_path / "m"
    res = runner.invoke(app, ["init-embeddings", "--llm", llm, "--codec", "patch-p2-k16", "--codec", "mel-80-k32",
                              "--image-size", "8", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    assert (out / "config.json").is_file() and (out / "adapter.safetensors").is_file()
    res = runner.invoke(app, ["init-embeddings", "--llm", llm, "--codec", "patch-p2-k16", "--image-size", "8", "-o", str(out)])
    assert res.exit_code == 2 and "already exists; pass --force" in res.stderr
    res = runner.invoke(app, ["init-embeddings", "--llm", llm, "--codec", "patch-p2-k16", "--image-size", "8",
                              "--init", "random", "--code-dim", "24", "-o", str(out), "--force", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["codecs"][0]["code_dim"] == 24
    cases = [
        (["--codec", "nope"], 1, "unknown codec 'nope'"),
        (["--codec", "patch-p2-k16"], 2, "keeps the input size"),
        (["--codec", "patch-p2-k16", "--image-size", "8", "--code-dim", "7"], 2, "differs from codec 'patch-p2-k16''s codebook width 12"),
        ([], 2, "give at least one --codec"),
        (["--codec", "patch-p2-k16", "--image-size", "9"], 2, "not a multiple"),
    ]
    for args, code, message in cases:
        res = runner.invoke(app, ["init-embeddings", "--llm", llm, *args, "-o", str(tmp_path / "x")])
        assert res.exit_code == code, (args, res.output)
        errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0] and res.stderr.splitlines()[-1] == errors[0], res.stderr
        assert "Traceback" not in res.stderr
        assert not (tmp_path / "x").exists()


def test_target_loss_is_cross_entropy_under_the_segment_grammar(llm_dirs, codecs):
    import torch.nn.functional as F

    model = build(llm_dirs["llama"], ["patch-p2-k16", "mel-80-k32"], image_size=8, seed=2)
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    rec = Record(id="t", segments=[Segment("text", text="draw a seven"),
                                   Segment("image", codec="patch-p2-k16", tokens=list(range(16)), shape=[4, 4])])
    enc = model.encode_record(rec)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        hidden, _ = model.hidden_states(ids)
        h, labels = hidden[0, :-1], ids[0, 1:]
        loss = model.target_loss(h, labels)
        full = model.logits(h)
    cfg = model.config
    img = cfg.codecs[0]
    opens = [cfg.boundary_id("image"), cfg.boundary_id("audio")]
    text_cols = torch.cat([torch.arange(cfg.text_vocab_size), torch.tensor(opens)])
    for i, label in enumerate(labels.tolist()):
        if img.offset <= label < img.offset + img.vocab_size:
            cols = torch.arange(img.offset, img.offset + img.vocab_size)
        elif label == opens[0] + 1:
            assert loss[i] == 0  # </img> is forced by the grammar
            continue
        else:
            cols = text_cols
        expect = -F.log_softmax(full[i, cols], -1)[(cols == label).nonzero().item()]
        torch.testing.assert_close(loss[i], expect, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="input-only"):
        cross = build(llm_dirs["llama"], ["patch-p2-k16"], roles=["input"], image_size=8)
        cross.target_loss(torch.zeros(1, cfg.hidden_size), torch.tensor([cross.config.codecs[0].offset]))


def test_model_folder_follows_the_umask(llm_dirs, codecs, tmp_path):
    """Issue 30: a saved model folder was 0700 and its adapter 0600 whatever the umask."""
    import os
    import stat

    model = build(llm_dirs["llama"], ["patch-p2-k16"], image_size=8)
    old = os.umask(0o002)
    try:
        model.save(tmp_path / "m")
        model.save(tmp_path / "m")  # the second save replaces the two files in place
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o775
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "m").iterdir()} == {0o664}


def test_target_loss_scores_the_end_of_speech(llm_dirs, codecs):
    """Inside audio the model ends the segment itself, so ``</aud>`` is a target like the codec
    ids (without it a trained model never closes a segment): both are scored against the audio
    codec's ids plus ``</aud>``, as generation's audio states allow."""
    import torch.nn.functional as F

    model = build(llm_dirs["llama"], ["patch-p2-k16", "mel-80-k32"], image_size=8, seed=2)
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    rec = Record(id="t", segments=[Segment("text", text="say seven"),
                                   Segment("audio", codec="mel-80-k32", tokens=[3, 3, 7, 1, 0], frame_rate=100)])
    enc = model.encode_record(rec)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        hidden, _ = model.hidden_states(ids)
        h, labels = hidden[0, :-1], ids[0, 1:]
        loss = model.target_loss(h, labels)
        full = model.logits(h)
    cfg = model.config
    aud = cfg.codecs[1]
    close = cfg.boundary_id("audio", closing=True)
    cols = torch.cat([torch.arange(aud.offset, aud.offset + aud.vocab_size), torch.tensor([close])])
    scored = 0
    for i, label in enumerate(labels.tolist()):
        if aud.offset <= label < aud.offset + aud.vocab_size or label == close:
            expect = -F.log_softmax(full[i, cols], -1)[(cols == label).nonzero().item()]
            torch.testing.assert_close(loss[i], expect, atol=1e-4, rtol=1e-4)
            scored += 1
    assert scored == 6 and labels.tolist().count(close) == 1
    assert loss[labels == close].item() > 0
    # and the gradient reaches the </aud> row of boundary_out
    model.zero_grad()
    hidden, _ = model.hidden_states(ids)
    model.target_loss(hidden[0, :-1], labels)[labels == close].sum().backward()
    assert model.boundary_out.grad[close - cfg.boundary_offset].abs().sum() > 0
