"""Compiled static-cache decoding (``GenerateOptions.compile``): the same answers as the eager
steps, the cache's size, the ``auto`` decision, the CLI option.

torch.compile's code generation takes about a minute on a tiny model on a shared 2-core CPU,
so the default tests trace the step with the ``eager`` backend (the same dynamo graph and
static cache, run by torch's own kernels); one slow test runs inductor."""

from __future__ import annotations

import pytest
import torch

from teal_cli.errors import DataError, UsageError
from teal_cli.model import generate as gen
from teal_cli.model.generate import (CompiledSteps, EagerSteps, GenerateOptions, Grammar, eager_seconds, generate,
                                     row_step_bound, use_compiled)
from teal_cli.records import Record, Segment
from test_generate import build, codec_dirs, llm_dirs, prompts, root, text_ids  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    monkeypatch.setattr(gen, "COMPILE_BACKEND", "eager")


@pytest.fixture(scope="module")
def models(llm_dirs, codec_dirs):  # noqa: F811
    """The Llama opens image segments by itself (free answers mix text and images). Every
    test decodes 4 rows into a 64-slot cache: one shape, so each model compiles once."""
    return {"llama": build(llm_dirs["llama"], codec_dirs, eager=True), "gpt2": build(llm_dirs["gpt2"], codec_dirs)}


def segments(model, recs, **options):
    return [o.to_json()["segments"] for o in generate(model, recs, GenerateOptions(**options))]


def spy_steps(monkeypatch):
    """Record which step class each batch used."""
    used = []
    original = gen.decoding_steps

    def spy(*a, **k):
        steps = original(*a, **k)
        used.append(type(steps))
        return steps

    monkeypatch.setattr(gen, "decoding_steps", spy)
    return used


@pytest.mark.parametrize("name, mode", [("llama", "image"), ("llama", "text"), ("llama", "audio"), ("llama", None),
                                        pytest.param("gpt2", "image", marks=pytest.mark.slow)])
def test_compiled_gives_the_eager_greedy_answers(models, monkeypatch, name, mode):
    """Left-padded batches of text and image+text prompts of different lengths."""
    used = spy_steps(monkeypatch)
    recs = prompts(4)
    opts = dict(max_new_tokens=12, output_modality=mode, batch_size=4, max_audio_seconds=0.1)
    eager = segments(models[name], recs, compile="off", **opts)
    compiled = segments(models[name], recs, compile="on", **opts)
    assert used == [EagerSteps, CompiledSteps]
    assert compiled == eager
    if mode is None:  # the model opens image segments by itself: a mixed answer
        assert any(s["modality"] == "image" for segs in compiled for s in segs)


def test_compiled_cfg_rows_give_the_eager_answers(models):
    recs = prompts(2)  # + 2 unconditional rows
    opts = dict(output_modality="image", cfg_scale=3.0, batch_size=2)
    assert segments(models["llama"], recs, compile="on", **opts) == segments(models["llama"], recs, compile="off", **opts)
    # and CFG is really on: the guided answer is not the plain one
    assert segments(models["llama"], recs, compile="on", **opts) != segments(models["llama"], recs, compile="off",
                                                                             output_modality="image", batch_size=2)


def test_compiled_steps_match_the_eager_hidden_states(models):
    """Step by step, the static cache's hidden states equal the dynamic cache's to float
    tolerance (the attention sums run over other lengths), so sampled ids agree unless a
    draw lands within that tolerance of a token boundary."""
    model = models["llama"]
    seqs = [text_ids(model, t) for t in ("The capital of France is", "zero", "draw a nine", "a handwritten seven")]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    eager, compiled = EagerSteps(model), CompiledSteps(model, 4, width + 8)
    with torch.inference_mode():
        torch.testing.assert_close(compiled.prefill(ids, attn), eager.prefill(ids, attn), rtol=0, atol=0)
        gen_ = torch.Generator().manual_seed(0)
        for step in range(6):
            feed = torch.randint(0, model.config.vocab_size, (4, 1), generator=gen_)
            attn = torch.cat([attn, torch.ones(4, 1, dtype=attn.dtype)], dim=1)
            pos = torch.tensor([[len(s) + step] for s in seqs])
            torch.testing.assert_close(compiled.step(feed, attn, pos), eager.step(feed, attn, pos), rtol=1e-5, atol=1e-5)


def test_compiled_sampling_with_a_seed_gives_the_eager_samples(models):
    recs = prompts(4)
    opts = dict(temperature=1.0, top_p=0.9, seed=11, batch_size=4, max_new_tokens=10)
    for mode in ("image", "text"):
        assert segments(models["llama"], recs, compile="on", output_modality=mode, **opts) == \
            segments(models["llama"], recs, compile="off", output_modality=mode, **opts)


def test_static_cache_holds_the_longest_possible_answer(models):
    model = models["llama"]
    entry = model.config.codec("patch-p2-k16")
    forced = GenerateOptions(output_modality="image")
    # <img>, H*W ids, </img> fed after the prompt (the last chosen token is never fed: +1 slack)
    assert row_step_bound([5, 9], forced, Grammar(model, forced), None) == entry.tokens_per_item + 3
    text = GenerateOptions(max_new_tokens=7, output_modality="text")
    assert row_step_bound([5], text, Grammar(model, text), None) == 8
    free = GenerateOptions(max_new_tokens=7)
    # each text token may open the longest segment (audio: 10 s at 100 frames/s), capped by the context
    assert row_step_bound([5], free, Grammar(model, free), None) == 7 * (1 + 1000 + 1) + 1
    assert row_step_bound([5, 30], free, Grammar(model, free), 64) == 64 - 5 + 1
    steps = CompiledSteps(model, 3, 70)
    assert steps.length == 128 and steps.keep.shape == (3, 128)
    assert all(layer.max_cache_len == 128 for layer in steps.cache.layers)


def test_a_prompt_that_fills_the_context_is_the_same_clean_error(models):
    model = models["llama"]
    context = model.context_length
    long = Record("long", [Segment("text", text="seven " * context)])
    for compile_ in ("on", "off"):
        with pytest.raises(DataError, match="record 'long'.*context"):
            list(generate(model, [long], GenerateOptions(compile=compile_)))


def test_answers_that_run_into_the_context_end_fit_the_static_cache(models):
    """Rows stop at the context; the cache sized for that never overflows."""
    model = models["llama"]
    context = model.context_length
    words = context
    while len(text_ids(model, "seven " * words)) > context - 10:
        words -= 1
    near = Record("near", [Segment("text", text="seven " * words)])
    recs = [near] + prompts(3)
    opts = dict(max_new_tokens=40, batch_size=4)
    eager = list(generate(model, recs, GenerateOptions(compile="off", **opts)))
    compiled = list(generate(model, recs, GenerateOptions(compile="on", **opts)))
    assert [o.to_json()["segments"] for o in compiled] == [o.to_json()["segments"] for o in eager]
    assert eager[0].extra["generation"]["finish"] == "context"


def test_compile_off_and_auto_keep_the_eager_steps(models, monkeypatch):
    used = spy_steps(monkeypatch)
    recs = prompts(3)
    off = segments(models["llama"], recs, output_modality="image", compile="off")
    auto = segments(models["llama"], recs, output_modality="image")  # 3 rows x 19 steps: below the threshold
    assert used == [EagerSteps, EagerSteps] and auto == off


def test_auto_compiles_once_the_eager_decoding_time_would_have_paid_for_it(models, monkeypatch):
    model = models["gpt2"]
    monkeypatch.setitem(model.__dict__, "_eager_seconds", 0.0)
    monkeypatch.setattr(gen, "AUTO_COMPILE_SECONDS", {"cpu": 120.0})  # tests/conftest.py turns "auto" off
    auto = GenerateOptions()
    assert not use_compiled(model, auto)
    eager_seconds(model, 119.0)
    assert not use_compiled(model, auto)
    assert not use_compiled(model, GenerateOptions(compile="off"))
    # Each eager batch adds the seconds it actually took (not its bound): a batch of free answers
    # or one that ends early counts what it spent.
    segments(model, prompts(2), output_modality="image", compile="auto")
    assert 119.0 < model.__dict__["_eager_seconds"] < 119.0 + 60
    eager_seconds(model, 1.0)
    assert use_compiled(model, auto)  # the spent time reached the expected compile cost
    assert not use_compiled(model, auto, tight=False)  # a free answer's loose bound: stays eager
    monkeypatch.setattr(model.llm.config, "_attn_implementation", "flash_attention_2")
    assert not use_compiled(model, auto)
    with pytest.raises(UsageError, match="--compile on: attention implementation 'flash_attention_2'"):
        use_compiled(model, GenerateOptions(compile="on"))


def test_compile_option_is_checked():
    with pytest.raises(UsageError, match="--compile yes: expected one of auto, on, off"):
        GenerateOptions(compile="yes").check()


def test_cli_compile_option(cli, llm_dirs, codec_dirs, isolated, monkeypatch):  # noqa: F811
    directory = isolated / "model"
    build(llm_dirs["llama"], codec_dirs).save(directory)
    seen = []
    monkeypatch.setattr(gen, "use_compiled", lambda model, options, *a: seen.append(options.compile) or False)
    for value in ("on", "off"):
        result = cli("generate", "--model", directory, "--text", "a seven", "--output-modality", "image",
                     "--compile", value, "-q")
        assert result.exit_code == 0, result.stderr
        assert f'"compile": "{value}"' in result.stdout
    assert seen == ["on", "off"]
    bad = cli("generate", "--model", directory, "--text", "a seven", "--compile", "maybe")
    assert bad.exit_code == 2 and "--compile maybe" in bad.stderr


@pytest.mark.slow  # inductor's code generation: about a minute on a shared 2-core CPU
def test_inductor_compiled_step_gives_the_eager_answers(models, monkeypatch):
    monkeypatch.setattr(gen, "COMPILE_BACKEND", "inductor")
    recs = prompts(4)
    for mode in ("image", None):
        opts = dict(max_new_tokens=10, output_modality=mode, batch_size=4)
        assert segments(models["llama"], recs, compile="on", **opts) == segments(models["llama"], recs, compile="off", **opts)


@pytest.mark.requires_cuda
def test_cuda_graph_compiled_step_gives_the_eager_answers(llm_dirs, codec_dirs, monkeypatch):  # noqa: F811
    """On a GPU the step is compiled with mode="reduce-overhead" (CUDA graphs)."""
    monkeypatch.setattr(gen, "COMPILE_BACKEND", "inductor")
    model = build(llm_dirs["llama"], codec_dirs, eager=True).cuda()
    recs = prompts(4)
    for mode in ("image", None):
        opts = dict(max_new_tokens=10, output_modality=mode, batch_size=4)
        assert segments(model, recs, compile="on", **opts) == segments(model, recs, compile="off", **opts)
