"""teal export: the plain Hugging Face checkpoint, its grammar processor, and --engine hf.

Tiny Llama and GPT-2 models with bias-norm (scale mode) and LoRA set to random,
non-identity values, so every fold and merge shows in the logits; the exported directory is
loaded by plain ``AutoModelForCausalLM`` and must give teal's greedy ids exactly.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teal_cli.errors import UsageError
from teal_cli.model.export import ExportError, codec_token, export_dir, export_model
from teal_cli.model.generate import GenerateOptions, Grammar, generate, generate_ids
from teal_cli.model.teal_model import TealModel
from teal_cli.records import Record, Segment
from tiny_teal import make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MODES = [None, "image", "audio", "text"]


def randomize(model: TealModel, *, bias_norm: str | None = "scale", lora: int | None = 4, seed: int = 1) -> None:
    """Add bias-norm / LoRA and set every adapter parameter to random non-identity values."""
    from teal_cli.model.bias_norm import add_bias_norm
    from teal_cli.model.lora import add_lora, lora_config

    if bias_norm:
        add_bias_norm(model.backbone, bias_norm)
        model.config.groups["bias_norm"] = bias_norm
    if lora:
        add_lora(model, lora_config(lora))
        model.config.groups["lora"] = lora_config(lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            if name.endswith(("teal_scale", "teal_norm_weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("teal_bias", "teal_norm_bias")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "proj_out" in name:  # init is ~1e-3: codec logits would be near-ties
                p.copy_(4 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "proj_in.bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
        # An <img> output row along the mean hidden state of a text, scaled to beat the best
        # text logit at about half its positions: the model then opens image segments itself.
        ids = torch.tensor([model.encode_record(Record("r", [Segment("text", text="a handwritten seven, draw a nine")])).ids])
        hidden = model.hidden_states(ids)[0][0].float()
        mean = hidden.mean(0)
        ratio = model.lm_head(hidden).float().max(-1).values / (hidden @ mean)
        img = model.config.boundary_id("image") - model.config.boundary_offset
        model.boundary_out[img] = mean * ratio.median()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory):
    """``(teal model, model dir, exported dir)`` for a tiny ``arch`` with bias-norm and LoRA."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    model_dir = make_model_dir(root, request.param)
    model = TealModel.from_dir(model_dir)
    randomize(model)
    model.save(model_dir)
    out = export_dir(model_dir, root / "hf")
    return TealModel.from_dir(model_dir).eval(), model_dir, out


def prompts(model: TealModel) -> list[Record]:
    rate = model.config.codec("mel-80-k32").segment["frame_rate"]
    return [Record("t", [Segment("text", text="a handwritten seven")]),
            Record("t2", [Segment("text", text="The quick brown fox jumps over the lazy dog.")]),
            Record("i", [Segment("image", codec="patch-p2-k16", tokens=[(5 * i) % 16 for i in range(16)], shape=[4, 4]),
                         Segment("text", text="draw")]),
            Record("a", [Segment("audio", codec="mel-80-k32", tokens=[1, 5, 7, 30, 2], frame_rate=rate)])]


def load_standalone(directory: Path):
    """``teal_grammar.py`` from an exported directory, imported by path (as a user without teal would)."""
    spec = importlib.util.spec_from_file_location("teal_grammar_test", directory / "teal_grammar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------- the checkpoint


def test_plain_transformers_loads_the_export(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _, out = exported
    cfg = model.config
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(out)
    assert hf.config.vocab_size == cfg.vocab_size == len(tok)
    assert hf.get_input_embeddings().weight.data_ptr() != hf.get_output_embeddings().weight.data_ptr()
    img, img_close = cfg.boundary_id("image"), cfg.boundary_id("image", closing=True)
    assert tok.convert_ids_to_tokens([img, img_close, cfg.boundary_id("audio")]) == ["<img>", "</img>", "<aud>"]
    patch = cfg.codec("patch-p2-k16")
    assert codec_token("patch-p2-k16", 3) == "<|patch-p2-k16:3|>"
    assert tok("<img><|patch-p2-k16:3|></img>", add_special_tokens=False).input_ids == [img, patch.offset + 3, img_close]
    assert tok.convert_ids_to_tokens(cfg.vocab_size - 1) == "<|mel-80-k32:31|>"
    side = json.loads((out / "teal.json").read_text())
    assert side["boundary"]["image"] == {"open": img, "close": img_close, "open_token": "<img>", "close_token": "</img>"}
    entry = next(c for c in side["codecs"] if c["name"] == "patch-p2-k16")
    assert entry["offset"] == patch.offset and entry["shape"] == [4, 4] and entry["weights"] == patch.weights
    head = model.heads[patch.key]
    expected = (head.output @ head.proj_out.bias).detach()
    assert torch.equal(torch.tensor(entry["logit_bias"], dtype=torch.float32), expected)
    assert expected.abs().max() > 0.1  # the bias matters: randomize() set it


def test_logits_match_to_fp32_tolerance(exported):
    from transformers import AutoModelForCausalLM

    model, _, out = exported
    grammar = load_standalone(out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    patch, mel = cfg.codec("patch-p2-k16"), cfg.codec("mel-80-k32")
    ids = (model._prefix_ids + torch.randint(0, cfg.text_vocab_size, (5,), generator=g).tolist()
           + [cfg.boundary_id("image")] + (patch.offset + torch.randint(0, 16, (16,), generator=g)).tolist()
           + [cfg.boundary_id("image", True), cfg.boundary_id("audio")]
           + (mel.offset + torch.randint(0, 32, (7,), generator=g)).tolist() + [cfg.boundary_id("audio", True), 7])
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model(x).logits[0]
        got = hf(x).logits[0] + grammar.logit_bias(grammar.load_sidecar(out))
    finite = torch.isfinite(ref)
    assert finite.all()  # every codec is written here: no -inf columns
    scale = ref[finite].abs().max()
    torch.testing.assert_close(got[finite], ref[finite], rtol=0, atol=1e-5 * float(scale))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_hf_engine_gives_teal_greedy_records(exported, batch_size):
    from teal_cli.model.hf_engine import ExportedModel, generate as hf_generate

    model, _, out = exported
    engine = ExportedModel(out)
    opened = 0
    for mode in MODES:
        options = GenerateOptions(max_new_tokens=10, output_modality=mode, batch_size=batch_size, max_audio_seconds=0.2)
        ours = [r.to_json() for r in generate(model, prompts(model), options)]
        theirs = [r.to_json() for r in hf_generate(engine, prompts(model), options)]
        for a, b in zip(ours, theirs, strict=True):
            ga, gb = a.pop("generation"), b.pop("generation")
            assert a == b, mode
            assert ga["finish"] == gb["finish"] and gb["engine"] == "hf"
            assert set(ga) | {"engine"} == set(gb)
            if mode is None:
                opened += any(s["modality"] == "image" for s in a["segments"])
            if mode == "image":
                assert [s["shape"] for s in a["segments"]] == [[4, 4]]
    assert opened  # the free mode really exercised a segment the model opened itself


def test_hf_engine_echo_marks_the_prompt_as_teal_does(exported):
    """--echo under --engine hf: the echoed prompt says it is the prompt (eval leaves it out), and
    the record equals teal's echo."""
    from teal_cli.model.hf_engine import ExportedModel, generate as hf_generate

    model, _, out = exported
    options = GenerateOptions(max_new_tokens=4, output_modality="text", batch_size=2, echo=True)
    ours = [r.to_json() for r in generate(model, prompts(model), options)]
    theirs = [r.to_json() for r in hf_generate(ExportedModel(out), prompts(model), options)]
    for a, b in zip(ours, theirs, strict=True):
        a.pop("generation"), b.pop("generation")
        assert a == b
        echoed = [s for s in b["segments"] if s.get("role") == "prompt"]
        assert echoed and echoed == b["segments"][:len(echoed)]


def test_standalone_processor_with_plain_generate(exported):
    """The copied ``teal_grammar.py`` + ``model.generate`` (no teal in the loop) gives teal's ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _, out = exported
    tg = load_standalone(out)
    side = tg.load_sidecar(out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    for mode in MODES:
        options = GenerateOptions(max_new_tokens=8, output_modality=mode, max_audio_seconds=0.2)
        grammar = Grammar(model, options)
        for rec in prompts(model):
            ids = tg.prompt_ids(rec.to_json(), side, tok)
            assert ids == model.encode_record(rec, prompt_only=True).ids
            want = generate_ids(model, [ids], options, grammar)[0]
            proc = tg.TealGrammarProcessor(out, output_modality=mode, max_new_tokens=8, max_audio_seconds=0.2)
            gen = hf.generate(torch.tensor([ids]), do_sample=False, logits_processor=[proc],
                              max_new_tokens=proc.grammar.max_new_tokens_bound(), pad_token_id=side["eos_token_id"])
            row = tg.run_grammar(proc.grammar, gen[0, len(ids):].tolist())
            assert (row.ids, row.finish) == (want.ids, want.finish), (mode, rec.id)
            segs = tg.segments_from_ids(row.ids, side, tok)
            assert segs == [s.to_json() for s in model.decode_ids(want.ids)]


def test_sampling_through_hf_keeps_the_grammar(exported):
    from teal_cli.model.hf_engine import ExportedModel, generate as hf_generate

    model, _, out = exported
    options = GenerateOptions(output_modality="image", temperature=1.0, top_k=8, top_p=0.9, seed=5, batch_size=4)
    records = list(hf_generate(ExportedModel(out), prompts(model), options))
    for r in records:
        (seg,) = r.segments
        assert seg.shape == [4, 4] and len(seg.tokens) == 16 and all(0 <= t < 16 for t in seg.tokens)


def test_standalone_grammar_imports_no_teal(exported):
    _, _, out = exported
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('tg', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "p = m.TealGrammarProcessor(sys.argv[2], output_modality='image'); "
            "assert not [k for k in sys.modules if k.startswith('teal_cli')]; print(p.grammar.max_new_tokens_bound())")
    done = subprocess.run([sys.executable, "-c", code, str(out / "teal_grammar.py"), str(out)], capture_output=True,
                          text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 16 + 2 + 1


# ---------------------------------------------------------------------- refusals and the CLI


def test_qwen2_bias_norm_is_refused_lora_is_exported(tmp_path):
    """Qwen2's o_proj and MLP have no bias and no config option for one: bias-norm cannot be
    exact there; LoRA alone can."""
    model_dir = make_model_dir(tmp_path, "qwen2", audio=False)
    model = TealModel.from_dir(model_dir)
    randomize(model, bias_norm="bias", lora=None)
    with pytest.raises(ExportError, match=r"^cannot merge bias-norm exactly into Qwen2ForCausalLM: layer '.*o_proj' has no bias"):
        export_model(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    model = TealModel.from_dir(model_dir)
    randomize(model, bias_norm=None, lora=4)
    out = export_model(model, tmp_path / "lora")  # verify=True: loads back and compares logits
    assert (out / "teal.json").is_file()


def test_rmsnorm_with_a_tuned_bias_is_refused(tmp_path):
    model_dir = make_model_dir(tmp_path, "llama", audio=False)
    model = TealModel.from_dir(model_dir)
    randomize(model, bias_norm="bias", lora=None)
    norm = model.backbone.norm
    norm.teal_norm_bias = torch.nn.Parameter(torch.ones(norm.weight.shape[0]))
    with pytest.raises(ExportError, match="norm 'norm' .*RMSNorm.* has a tuned bias but no bias of its own"):
        export_model(model, tmp_path / "out")


def test_cli_export_and_generate_engine_hf(exported, cli, tmp_path):
    model, model_dir, out = exported
    r = cli("export", model_dir, "-o", out)
    assert r.exit_code == 2 and "exists; pass --force" in r.stderr
    r = cli("export", model_dir, "-o", tmp_path / "again", "-q")
    assert r.exit_code == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "again"
    args = ["--text", "draw a nine", "--output-modality", "image", "-q"]
    teal = cli("generate", "--model", model_dir, *args)
    hf = cli("generate", "--engine", "hf", "--model", tmp_path / "again", *args)
    assert teal.exit_code == 0 and hf.exit_code == 0, hf.stderr
    a, b = json.loads(teal.stdout), json.loads(hf.stdout)
    assert a["segments"] == b["segments"] and len(a["segments"][0]["tokens"]) == 16
    r = cli("generate", "--engine", "hf", "--model", model_dir, *args)
    assert r.exit_code == 2 and "export it first with 'teal export" in r.stderr
    r = cli("generate", "--model", out, *args)
    assert r.exit_code == 2 and "run it with --engine hf" in r.stderr
    r = cli("generate", "--engine", "hf", "--model", out, "--cfg-scale", "3", *args)
    assert r.exit_code == 2 and "--cfg-scale" in r.stderr
    r = cli("generate", "--engine", "vllm", "--model", out, *args)
    assert r.exit_code == 2 and "expected teal or hf" in r.stderr


def test_processor_rejects_bad_options(exported):
    from teal_cli.model.hf_engine import ExportedModel, generate as hf_generate

    _, _, out = exported
    with pytest.raises(UsageError, match="codec 'nope' is not part of this model"):
        list(hf_generate(ExportedModel(out), [], GenerateOptions(codec="nope")))


# ---------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_export_gives_teal_greedy_ids(smollm2_dir, tmp_path):
    """SmolLM2-135M (tied embeddings, Llama), bias-norm + LoRA, a 16x16 image codec: the
    exported checkpoint under transformers' generate gives teal's greedy ids, text and image."""
    from teal_cli.codecs.kmeans_codec import load_codec_dir, save_codec_dir
    from teal_cli.features.patch import PatchFeatures
    from teal_cli.model import init_model
    from teal_cli.model.hf_engine import ExportedModel, generate as hf_generate
    from teal_cli.model.llm import load_base_llm

    g = torch.Generator().manual_seed(0)
    codec_dir = save_codec_dir(tmp_path / "patch-p2-k64", PatchFeatures(2, image_size=32), torch.rand(64, 12, generator=g), {})
    model = init_model(load_base_llm(str(smollm2_dir)), [load_codec_dir(codec_dir)], image_size=32,
                       codec_paths=[str(codec_dir)])
    randomize(model)
    model.save(tmp_path / "model")
    out = export_dir(tmp_path / "model", tmp_path / "hf")
    model = TealModel.from_dir(tmp_path / "model").eval()
    engine = ExportedModel(out)
    records = [Record("t", [Segment("text", text="The capital of France is")]),
               Record("i", [Segment("text", text="Draw a handwritten seven:")])]
    for mode, n in (("text", 16), ("image", 16)):
        options = GenerateOptions(max_new_tokens=n, output_modality=mode, batch_size=2)
        ours = [r.to_json() for r in generate(model, records, options)]
        theirs = [r.to_json() for r in hf_generate(engine, records, options)]
        for a, b in zip(ours, theirs, strict=True):
            assert a["segments"] == b["segments"], mode
        if mode == "image":
            assert all(len(r["segments"][0]["tokens"]) == 256 for r in ours)


def test_request_processor_gives_teal_ids(exported):
    """The per-request form (vLLM / llama-cpp-python call it with the generated ids and one
    logits row) in a hand-written greedy loop over the plain checkpoint."""
    from transformers import AutoModelForCausalLM

    model, _, out = exported
    tg = load_standalone(out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    options = GenerateOptions(max_new_tokens=6)
    grammar = Grammar(model, options)
    for rec in prompts(model):
        ids = model.encode_record(rec, prompt_only=True).ids
        want = generate_ids(model, [ids], options, grammar)[0]
        proc = tg.TealRequestProcessor(out, max_new_tokens=6)
        generated: list[int] = []
        # Every grammar path ends with the model emitting EOS (forced once the row is done).
        while (not generated or generated[-1] != proc.grammar.eos) and len(generated) < 200:
            with torch.no_grad():
                logits = hf(torch.tensor([ids + generated])).logits[0, -1]
            generated.append(int(proc(generated, logits).argmax()))
        row = tg.run_grammar(proc.grammar, generated)
        assert (row.ids, row.finish) == (want.ids, want.finish), rec.id


@pytest.mark.slow
def test_a_model_trained_by_teal_train_exports_exactly(tmp_path, cli):
    """Stage 1, then stage 2 adding bias-norm (scale) and LoRA, through teal's trainer; the
    CLI export gives the trained model's greedy records under --engine hf."""
    from teal_cli.train import TrainOptions, train
    from tiny_teal import toy_captions, toy_pairs

    model_dir = make_model_dir(tmp_path, "llama", audio=False)
    common = dict(batch_size=8, max_steps=4, lr=1e-2, device="cpu", checkpoint_every=0)
    train(model_dir, TrainOptions(data=str(toy_pairs(tmp_path / "p.jsonl", 16)), stage=1, **common))
    train(model_dir, TrainOptions(data=str(toy_captions(tmp_path / "c.jsonl", 16)), stage=2, bias_norm="scale", lora=4,
                                  train=["bias_norm"], **common))
    assert json.loads((model_dir / "config.json").read_text())["groups"]["bias_norm"] == "scale"
    r = cli("export", model_dir, "-o", tmp_path / "hf", "-q")
    assert r.exit_code == 0, r.stderr
    side = json.loads((tmp_path / "hf" / "teal.json").read_text())
    assert side["source"]["adapter_sha256"] == TealModel.from_dir(model_dir).adapter_sha256(model_dir)
    prompt = tmp_path / "prompt.jsonl"
    prompt.write_text(Record("q", [Segment("image", codec="patch-p2-k16", tokens=list(range(16)), shape=[4, 4]),
                                   Segment("text", text="Describe this image in a few words:")]).dumps() + "\n")
    for mode in ("text", "image"):
        args = [prompt, "--output-modality", mode, "-n", "8", "-q"]
        a = cli("generate", "--model", model_dir, *args)
        b = cli("generate", "--engine", "hf", "--model", tmp_path / "hf", *args)
        assert a.exit_code == 0 and b.exit_code == 0, b.stderr
        assert json.loads(a.stdout)["segments"] == json.loads(b.stdout)["segments"], mode
