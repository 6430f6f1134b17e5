"""Base-LLM loading (teal_cli.model.llm): tiny HF models in the real format, local folders
and a fake hub cache. The offline default's conversion is tested in test_smollm2.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from teal_cli.errors import DownloadError, TealError, UsageError
from teal_cli.weights import digests
from teal_cli.weights.digests import sha256sum
from teal_cli.model.llm import base_llm_fingerprint, load_base_llm

from tiny_llm import make_tiny_llm

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """One tiny model per architecture (tied, as SmolLM2 is), plus an untied Llama."""
    root = tmp_path_factory.mktemp("tiny-llms")
    dirs = {arch: make_tiny_llm(root / arch, arch) for arch in ("llama", "qwen2", "gpt2")}
    dirs["llama-untied"] = make_tiny_llm(root / "llama-untied", "llama", tie=False, seed=1)
    return dirs


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def reference(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory)).eval()


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_models_load_frozen_untied_and_unchanged(tiny_dirs, arch):
    base = load_base_llm(str(tiny_dirs[arch]))
    model = base.model
    assert base.source == str(tiny_dirs[arch]) and base.revision is None and base.name == str(tiny_dirs[arch])
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert model.config.tie_word_embeddings is False
    assert emb.data_ptr() != head.data_ptr()
    assert torch.equal(emb, head)  # a copy with the same values
    # Same logits as transformers' own load of the tied model.
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(tiny_dirs[arch])(IDS).logits)
    assert base.tokenizer.decode(base.tokenizer("a handwritten seven")["input_ids"]) == "a handwritten seven"


def test_untied_head_is_independent_of_embedding(tiny_dirs):
    model = load_base_llm(str(tiny_dirs["llama"])).model
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    before = emb.clone()
    with torch.no_grad():
        head.add_(1.0)
    assert torch.equal(emb, before)
    model.tie_weights()  # what transformers (or peft) may call later must not tie them again
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_untied_model_keeps_its_own_head(tiny_dirs):
    base = load_base_llm(str(tiny_dirs["llama-untied"]))
    ref = reference(tiny_dirs["llama-untied"])
    assert torch.equal(base.model.lm_head.weight, ref.lm_head.weight)
    assert not torch.equal(base.model.lm_head.weight, base.model.model.embed_tokens.weight)


def test_dtype_and_device(tiny_dirs):
    base = load_base_llm(str(tiny_dirs["llama"]), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in base.model.parameters()} == {"cpu"}


def test_fingerprint_stable_cached_and_sensitive(tiny_dirs, tmp_path, monkeypatch):
    d = copy_of(tiny_dirs["llama"], tmp_path / "m")
    source, revision, digest = base_llm_fingerprint(str(d))
    assert (source, revision) == (str(d), None)
    # The documented definition: sha256 of `sha256sum <weight files>` lines.
    line = f"{sha256sum(d / 'model.safetensors')}  model.safetensors\n"
    import hashlib

    assert digest == hashlib.sha256(line.encode()).hexdigest()
    assert not (d / "model.safetensors.sha256").exists()  # the digest is cached in teal's cache, not beside the weights
    assert load_base_llm(str(d)).weights_sha256 == digest
    # A second call reads the cache instead of hashing again.
    calls = []
    monkeypatch.setattr(digests, "sha256sum", lambda p: calls.append(p) or sha256sum(p))
    assert base_llm_fingerprint(str(d))[2] == digest and calls == []
    # One changed weight changes it (same size: the cache is keyed by mtime, ctime and inode too).
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key][0, 0] += 1.0
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert base_llm_fingerprint(str(d))[2] != digest
    assert len(calls) == 1


def test_sharded_model_fingerprint_and_missing_shard(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "sharded"
    copy_of(tiny_dirs["llama"], d)
    (d / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"])).save_pretrained(str(d), max_shard_size="20KB")
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) >= 2
    base = load_base_llm(str(d))
    with torch.no_grad():
        torch.testing.assert_close(base.model(IDS).logits, reference(tiny_dirs["llama"])(IDS).logits)
    (d / shards[-1]).unlink()
    with pytest.raises(TealError, match=rf"{shards[-1]}: shard missing"):
        load_base_llm(str(d))


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_bad_directories_give_one_line_errors(tiny_dirs, tmp_path):
    with pytest.raises(TealError, match="no such model directory") as exc:
        load_base_llm(str(tmp_path / "nowhere"))
    one_line(exc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TealError, match="no config.json"):
        load_base_llm(str(tmp_path / "empty"))

    garbled = copy_of(tiny_dirs["llama"], tmp_path / "garbled")
    (garbled / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(TealError, match=r"config.json: not valid JSON") as exc:
        load_base_llm(str(garbled))
    one_line(exc)

    bad_weights = copy_of(tiny_dirs["llama"], tmp_path / "bad-weights")
    (bad_weights / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(TealError, match=r"model.safetensors: not a readable safetensors file") as exc:
        load_base_llm(str(bad_weights))
    one_line(exc)

    truncated = copy_of(tiny_dirs["llama"], tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TealError, match=r"model.safetensors: not a readable safetensors file"):
        load_base_llm(str(truncated))

    no_weights = copy_of(tiny_dirs["llama"], tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(TealError, match="no weights"):
        load_base_llm(str(no_weights))

    no_tokenizer = copy_of(tiny_dirs["llama"], tmp_path / "no-tokenizer")
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(TealError, match="cannot load its tokenizer") as exc:
        load_base_llm(str(no_tokenizer))
    one_line(exc)


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_config_that_does_not_fit_the_weights(tiny_dirs, tmp_path):
    wider = copy_of(tiny_dirs["llama"], tmp_path / "wider")
    edit_config(wider, hidden_size=64)
    with pytest.raises(TealError, match=r"model.safetensors: the weights do not fit .*config.json: .* is \(.*\) in the weights but") as exc:
        load_base_llm(str(wider))
    one_line(exc)
    deeper = copy_of(tiny_dirs["llama"], tmp_path / "deeper")
    edit_config(deeper, num_hidden_layers=3)
    with pytest.raises(TealError, match=r"weight\(s\) that .*config.json calls for are missing, e.g. model.layers.2.") as exc:
        load_base_llm(str(deeper))
    one_line(exc)
    unknown = copy_of(tiny_dirs["llama"], tmp_path / "unknown")
    edit_config(unknown, model_type="no-such-model")
    with pytest.raises(TealError, match="transformers cannot load it") as exc:
        load_base_llm(str(unknown))
    one_line(exc)


def test_revision_only_for_hub_ids(tiny_dirs):
    with pytest.raises(UsageError, match="revision applies to hub ids only"):
        load_base_llm(str(tiny_dirs["llama"]), revision="main")
    with pytest.raises(UsageError, match="no revisions"):
        load_base_llm("smollm2-135m", revision="main")


def fake_hub_cache(root: Path, repo_id: str, model_dir: Path, commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """A Hugging Face hub cache holding ``repo_id`` at ``commit`` in huggingface_hub's layout:
    files as blobs (weights named by their sha256), snapshot entries as relative links."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    blobs, snap = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name.endswith(".sha256"):  # teal's markers are not part of a model
            continue
        blob = blobs / sha256sum(f)
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_hub_id_offline_reads_the_hub_cache(tiny_dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    snap = fake_hub_cache(cache, "someone/tiny-llama", tiny_dirs["llama"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    base = load_base_llm("someone/tiny-llama")
    assert base.source == str(snap) and base.revision == snap.name
    # LFS blobs are named by their sha256: the digest needs no hashing and no marker.
    assert base.weights_sha256 == base_llm_fingerprint(str(tiny_dirs["llama"]))[2]
    assert not any(p.name.endswith(".sha256") for p in snap.iterdir())
    assert all(not p.requires_grad for p in base.model.parameters())
    with pytest.raises(DownloadError, match=r"someone/other is not a local directory, nor in the Hugging Face cache, and offline mode is on: .*hf download someone/other") as exc:
        load_base_llm("someone/other")
    one_line(exc)
