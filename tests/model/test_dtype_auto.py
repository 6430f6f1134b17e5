"""``--dtype auto``: the frozen LLM in bf16 on CPUs that compute it natively, fp32 elsewhere;
the probe's answer cached per CPU model and torch version; codecs and trained parameters fp32."""

from __future__ import annotations

import json

import pytest
import torch

from teal_cli.runtime import device as dev
from teal_cli.runtime.device import cpu_auto_dtype, probe_cpu_dtype, resolve_dtype

CPU = torch.device("cpu")
ZEN3 = {"fpu", "avx", "avx2", "fma", "sse4_2"}               # this machine: no avx512_bf16
ZEN4 = ZEN3 | {"avx512f", "avx512_bf16", "avx512_vnni"}
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize("flags, expected", [(ZEN3, "float32"), (ZEN4, "bfloat16"), (SAPPHIRE_RAPIDS, "bfloat16"),
                                             (set(), "float32")])
def test_probe_picks_bf16_only_with_a_native_bf16_instruction(flags, expected):
    assert probe_cpu_dtype(flags) == expected


def test_probe_refuses_bf16_whose_products_are_wrong(monkeypatch):
    monkeypatch.setattr(dev, "bf16_sane", lambda: False)
    assert probe_cpu_dtype(ZEN4) == "float32"


def test_bf16_sanity_check_passes_on_this_machine():
    assert dev.bf16_sane()


def test_auto_is_bf16_for_the_llm_only_and_probed_once(monkeypatch, isolated):
    calls = []
    monkeypatch.setattr(dev, "cpu_flags", lambda: calls.append(1) or ZEN4)
    assert resolve_dtype("auto", CPU, llm=True) == torch.bfloat16
    assert resolve_dtype("auto", CPU) == torch.float32  # feature encoders and codecs
    assert resolve_dtype("float32", CPU, llm=True) == torch.float32
    assert resolve_dtype("auto", CPU, llm=True) == torch.bfloat16
    assert calls == [1]  # the second answer came from the cache file
    record = json.loads((isolated / "cache" / dev.CPU_DTYPE_RECORD).read_text())
    assert record == {f"{dev.cpu_model()} | torch {torch.__version__}": "bfloat16"}


def test_cache_is_keyed_by_cpu_model_and_torch_version(monkeypatch, isolated):
    monkeypatch.setattr(dev, "cpu_flags", lambda: ZEN3)
    assert cpu_auto_dtype() == torch.float32
    monkeypatch.setattr(dev, "cpu_model", lambda: "AMD EPYC 9R45 (Zen 5)")
    monkeypatch.setattr(dev, "cpu_flags", lambda: ZEN4)
    assert cpu_auto_dtype() == torch.bfloat16
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    monkeypatch.setattr(dev, "cpu_flags", lambda: ZEN3)
    assert cpu_auto_dtype() == torch.float32
    record = json.loads((isolated / "cache" / dev.CPU_DTYPE_RECORD).read_text())
    assert sorted(record.values()) == ["bfloat16", "float32", "float32"] and len(record) == 3


def test_a_damaged_cache_file_is_probed_again(monkeypatch, isolated):
    path = isolated / "cache" / dev.CPU_DTYPE_RECORD
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    monkeypatch.setattr(dev, "cpu_flags", lambda: ZEN4)
    assert cpu_auto_dtype() == torch.bfloat16
    assert list(json.loads(path.read_text()).values()) == ["bfloat16"]


def test_cli_generate_runs_the_llm_in_bf16_and_the_heads_in_fp32(monkeypatch, tmp_path):
    """What ``teal generate --dtype auto`` loads on a bf16 CPU: a bf16 LLM, fp32 teal
    parameters; greedy image ids stay in range and the answer is an image segment."""
    from test_generate import build, prompts, save_mel_codec, save_patch_codec
    from tiny_llm import make_tiny_llm

    from teal_cli.model import TealModel
    from teal_cli.model.teal_model import is_adapter_param
    from teal_cli.model.generate import GenerateOptions, generate

    monkeypatch.setattr(dev, "cpu_flags", lambda: ZEN4)
    codecs = {"patch": save_patch_codec(tmp_path / "codecs" / "patch-p2-k16"),
              "mel": save_mel_codec(tmp_path / "codecs" / "mel-80-k32")}
    build(make_tiny_llm(tmp_path / "llama", "llama"), codecs).save(tmp_path / "model")
    model = TealModel.from_dir(tmp_path / "model", dtype=resolve_dtype("auto", CPU, llm=True))
    params = dict(model.named_parameters())
    assert {p.dtype for n, p in params.items() if not is_adapter_param(n)} == {torch.bfloat16}
    assert {p.dtype for n, p in params.items() if is_adapter_param(n)} == {torch.float32}
    (out,) = generate(model, prompts(1), GenerateOptions(output_modality="image"))
    assert out.segments[0].modality == "image" and len(out.segments[0].tokens) == 16
    assert out.extra["generation"]["dtype"] == "bfloat16"
