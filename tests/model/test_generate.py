"""teal generate: the segment grammar, sampling, CFG, batching, the base model's text, the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teal_cli.errors import DataError, UsageError
from teal_cli.model.generate import GenerateOptions, Grammar, generate, generate_ids
from teal_cli.records import Record, Segment
from tiny_llm import make_tiny_llm

TEXTS = ["The capital of France is", "a handwritten seven", "draw a nine", "one two three four five six seven",
         "The quick brown fox jumps over the lazy dog.", "zero"]


# ---------------------------------------------------------------------- tiny models


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def llm_dirs(root):
    return {arch: make_tiny_llm(root / arch, arch) for arch in ("llama", "gpt2")}


def save_patch_codec(directory, k=16, p=2, seed=0):
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features.patch import PatchFeatures

    gen = torch.Generator().manual_seed(seed)
    return save_codec_dir(directory, PatchFeatures(p, image_size=8), torch.rand(k, 3 * p * p, generator=gen), {})


def save_mel_codec(directory, k=32, seed=1):
    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features.mel import MelFeatures

    gen = torch.Generator().manual_seed(seed)
    return save_codec_dir(directory, MelFeatures(80), torch.randn(k, 80, generator=gen) * 3 + 1, {})


@pytest.fixture(scope="module")
def codec_dirs(root):
    return {"patch": save_patch_codec(root / "codecs" / "patch-p2-k16"),
            "mel": save_mel_codec(root / "codecs" / "mel-80-k32"),
            "patch4": save_patch_codec(root / "codecs" / "patch-p4-k24", k=24, p=4, seed=2)}


def load_base(llm_dir):
    from teal_cli.model.llm import load_base_llm

    return load_base_llm(str(llm_dir))


def build(llm_dir, codec_dirs, names=("patch", "mel"), roles=None, eager=False):
    """A TEAL model over a tiny LLM. ``eager``: the <img> output row points along the mean
    hidden state, so the model opens image segments by itself (text, image, text, ...)."""
    from teal_cli.codecs.kmeans_codec import load_codec_dir
    from teal_cli.model import init_model

    codecs = [load_codec_dir(codec_dirs[n]) for n in names]
    model = init_model(load_base(llm_dir), codecs, roles=roles, image_size=8,
                       codec_paths=[str(codec_dirs[n]) for n in names])
    if eager:
        with torch.no_grad():
            hidden = torch.cat([model.hidden_states(torch.tensor([text_ids(model, t)]))[0][0] for t in TEXTS])
            mean = hidden.mean(0)
            top = model.lm_head(hidden).float().max(-1).values.mean()
            model.boundary_out[model.config.boundary_id("image") - model.config.boundary_offset] = mean / mean.norm() ** 2 * top
    return model.eval()


@pytest.fixture(scope="module")
def models(llm_dirs, codec_dirs):
    """Built once per module; generation never changes a model."""
    return {"llama": build(llm_dirs["llama"], codec_dirs), "gpt2": build(llm_dirs["gpt2"], codec_dirs),
            "eager": build(llm_dirs["gpt2"], codec_dirs, eager=True),
            "eager-llama": build(llm_dirs["llama"], codec_dirs, eager=True)}


def text_ids(model, text):
    return model.encode_record(Record("t", [Segment("text", text=text)]), prompt_only=True).ids


def prompts(n=6, seed=0):
    """Prompts of different lengths: text only, and image + text."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        segs = [Segment("text", text=TEXTS[i % len(TEXTS)])]
        if i % 2:
            segs.insert(0, Segment("image", codec="patch-p2-k16", tokens=[rng.randrange(16) for _ in range(16)], shape=[4, 4]))
        out.append(Record(id=f"p{i}", segments=segs))
    return out


def image_segments(record):
    return [s for s in record.segments if s.modality == "image"]


def reference_image(model, ids, scale=1.0, uncond_ids=None):
    """Greedy H*W ids of the first output image codec after ``ids + [<img>]``, recomputing
    the whole sequence each step (no cache, no padding, no batching), with CFG when
    ``scale != 1``: the independent oracle for the cached, batched decoder."""
    entry = model.config.output_codecs("image")[0]
    open_id = model.config.boundary_id("image")
    cond = list(ids) + [open_id]
    uncond = list(uncond_ids if uncond_ids is not None else model._prefix_ids) + [open_id]
    out = []
    with torch.no_grad():
        for _ in range(entry.tokens_per_item):
            lc = model(torch.tensor([cond])).logits[0, -1, entry.offset:entry.offset + entry.vocab_size]
            logits = lc
            if scale != 1.0:
                lu = model(torch.tensor([uncond])).logits[0, -1, entry.offset:entry.offset + entry.vocab_size]
                logits = lu + scale * (lc - lu)
            tok = entry.offset + int(logits.argmax())
            out.append(tok - entry.offset)
            cond.append(tok)
            uncond.append(tok)
    return out


# ---------------------------------------------------------------------- the grammar


def test_image_segments_have_exactly_hw_in_range_ids_for_any_settings(models):
    """A property test over random sampling settings, seeds, batch sizes and prompts, in the
    forced and the free (model opens segments itself) modes."""
    rng = random.Random(1234)
    for trial in range(16):
        name = rng.choice(["eager", "eager-llama", "llama"])
        model = models[name]
        entry = model.config.codec("patch-p2-k16")
        options = GenerateOptions(
            max_new_tokens=rng.choice([1, 3, 8, 20]), temperature=rng.choice([0.0, 0.3, 1.0, 2.0, 10.0]),
            top_k=rng.choice([None, 1, 2, 7, 500]), top_p=rng.choice([None, 0.05, 0.5, 0.95, 1.0]),
            seed=rng.randrange(2**31), cfg_scale=rng.choice([1.0, 0.0, 2.5, 7.0]),
            output_modality=rng.choice(["image", None]), batch_size=rng.choice([1, 2, 5]), max_audio_seconds=0.05)
        recs = prompts(rng.randrange(1, 6), seed=trial)
        outs = list(generate(model, recs, options))
        assert [o.id for o in outs] == [r.id for r in recs]
        for out in outs:
            images = image_segments(out)
            if options.output_modality == "image":
                assert len(out.segments) == 1 and len(images) == 1 and out.extra["generation"]["finish"] == "segment"
            for seg in images:
                assert seg.codec == "patch-p2-k16" and seg.shape == [4, 4], (trial, options)
                assert len(seg.tokens) == 16 and all(0 <= t < entry.vocab_size for t in seg.tokens), (trial, options)
            for seg in out.segments:
                if seg.modality == "audio":
                    assert 1 <= len(seg.tokens) <= 5 and all(0 <= t < 32 for t in seg.tokens)


def test_free_generation_opens_closes_and_returns_to_text(models):
    outs = list(generate(models["eager"], prompts(6), GenerateOptions(max_new_tokens=12)))
    kinds = [[s.modality for s in o.segments] for o in outs]
    # The eager model interleaves: some answers hold text, then an image, then text again.
    assert any("image" in k and "text" in k[k.index("image"):] for k in kinds), kinds
    for out in outs:
        generated = sum(1 for _ in out.segments)
        assert generated >= 1 and out.extra["generation"]["finish"] in ("eos", "max_new_tokens")


def test_audio_segments_stop_at_max_audio_seconds(models):
    opts = GenerateOptions(output_modality="audio", max_audio_seconds=0.07, temperature=1.0)
    for out in generate(models["llama"], prompts(3), opts):
        (seg,) = out.segments
        assert seg.modality == "audio" and seg.codec == "mel-80-k32" and seg.frame_rate == 100
        assert 0 < len(seg.tokens) <= 7 and all(0 <= t < 32 for t in seg.tokens)


def test_text_output_modality_never_opens_a_segment(models):
    for out in generate(models["eager"], prompts(4), GenerateOptions(max_new_tokens=10, output_modality="text",
                                                                     temperature=1.0)):
        assert [s.modality for s in out.segments] in (["text"], [])


def test_forced_image_matches_an_uncached_unbatched_greedy_decoder(models):
    """Batched (left-padded, KV-cached) greedy image generation equals recomputing the
    whole sequence each step for each prompt alone."""
    for name in ("llama", "gpt2"):
        model = models[name]
        recs = prompts(5)
        outs = list(generate(model, recs, GenerateOptions(output_modality="image", batch_size=5)))
        for rec, out in zip(recs, outs):
            ids = model.encode_record(rec, prompt_only=True).ids
            assert image_segments(out)[0].tokens == reference_image(model, ids), (name, rec.id)


# ---------------------------------------------------------------------- batching, seeds


@pytest.mark.parametrize("mode", ["text", "image", None])
def test_batched_equals_one_by_one_under_greedy(models, mode):
    model = models["eager"] if mode is None else models["llama"]
    recs = prompts(6)
    options = dict(max_new_tokens=10, output_modality=mode)
    batched = [o.to_json()["segments"] for o in generate(model, recs, GenerateOptions(batch_size=6, **options))]
    single = [o.to_json()["segments"] for o in generate(model, recs, GenerateOptions(batch_size=1, **options))]
    assert batched == single


def test_sampling_is_reproducible_and_independent_of_batch_composition(models):
    model = models["eager"]
    recs = prompts(5)
    opts = dict(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=8, seed=7)
    runs = [[o.to_json()["segments"] for o in generate(model, recs, GenerateOptions(batch_size=b, **opts))]
            for b in (5, 5, 2, 1)]
    assert runs[0] == runs[1] == runs[2] == runs[3]
    # A record's sample depends on its id and seed, not on its neighbours.
    alone = [o.to_json()["segments"] for o in generate(model, recs[3:4], GenerateOptions(**opts))]
    assert alone[0] == runs[0][3]
    other = [o.to_json()["segments"] for o in generate(model, recs, GenerateOptions(batch_size=5, **{**opts, "seed": 8}))]
    assert other != runs[0]


def test_repeated_prompts_get_distinct_samples(models):
    rec = prompts(1)[0]
    outs = list(generate(models["llama"], [rec, rec, rec], GenerateOptions(output_modality="image", temperature=1.0)))
    tokens = [image_segments(o)[0].tokens for o in outs]
    assert tokens[0] != tokens[1] and tokens[1] != tokens[2]
    assert [o.extra["generation"].get("repeat") for o in outs] == [None, 1, 2]


def test_top_k_1_is_greedy(models):
    recs = prompts(3)
    greedy = [o.segments[0].tokens for o in generate(models["gpt2"], recs, GenerateOptions(output_modality="image"))]
    top1 = [o.segments[0].tokens for o in generate(models["gpt2"], recs, GenerateOptions(output_modality="image",
                                                                                         temperature=3.0, top_k=1, seed=5))]
    assert greedy == top1


# ---------------------------------------------------------------------- classifier-free guidance


def test_cfg_follows_the_formula_against_an_uncached_oracle(models):
    model = models["gpt2"]
    recs = prompts(4)
    outs = list(generate(model, recs, GenerateOptions(output_modality="image", cfg_scale=3.0, batch_size=4)))
    plain = list(generate(model, recs, GenerateOptions(output_modality="image", batch_size=4)))
    for rec, out in zip(recs, outs):
        ids = model.encode_record(rec, prompt_only=True).ids
        assert image_segments(out)[0].tokens == reference_image(model, ids, scale=3.0), rec.id
    assert [o.segments[0].tokens for o in outs] != [o.segments[0].tokens for o in plain]


def test_cfg_scale_0_is_the_unconditional_image_in_every_segment(models):
    """With s = 0 the logits are the unconditional branch's: every image segment, the first
    and those the model opens later (the branch restarts from prefix + <img>), is the one
    an empty prompt gives."""
    model = models["eager"]
    uncond = reference_image(model, list(model._prefix_ids))
    outs = list(generate(model, prompts(6), GenerateOptions(max_new_tokens=12, cfg_scale=0.0)))
    images = [s.tokens for o in outs for s in image_segments(o)]
    assert len(images) >= 3 and any(len(image_segments(o)) >= 2 for o in outs)
    assert all(tokens == uncond for tokens in images)


def test_cfg_does_not_touch_text(models):
    model = models["eager"]
    recs = prompts(4)
    opts = dict(max_new_tokens=10, output_modality="text")
    assert [o.to_json()["segments"] for o in generate(model, recs, GenerateOptions(cfg_scale=5.0, **opts))] == \
           [o.to_json()["segments"] for o in generate(model, recs, GenerateOptions(**opts))]
    # Free mode: the text before the first image is the same with and without guidance.
    for a, b in zip(generate(model, recs, GenerateOptions(max_new_tokens=10, cfg_scale=5.0)),
                    generate(model, recs, GenerateOptions(max_new_tokens=10))):
        if a.segments[0].modality == "text":
            assert a.segments[0].text == b.segments[0].text


# ---------------------------------------------------------------------- the base model's text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_text_prompts_give_the_base_models_greedy_output(models, arch):
    model = models[arch]
    grammar = Grammar(model, GenerateOptions(output_modality="text"))
    free = Grammar(model, GenerateOptions())
    for text in TEXTS:
        ids = text_ids(model, text)
        hf = model.llm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=12, pad_token_id=model.eos_id)[0, len(ids):].tolist()
        if model.eos_id in hf:
            hf = hf[:hf.index(model.eos_id)]
        (ours,) = generate_ids(model, [ids], GenerateOptions(max_new_tokens=12, output_modality="text"), grammar)
        assert ours.ids == hf, text
        # Left to decide, the model writes the same text up to any segment it opens.
        (own,) = generate_ids(model, [ids], GenerateOptions(max_new_tokens=12), free)
        cut = next((i for i, t in enumerate(own.ids) if t >= model.config.text_vocab_size), len(own.ids))
        assert own.ids[:cut] == hf[:cut], text


def test_block_logits_equal_the_models_joint_logits(models):
    from teal_cli.model.generate import BOUNDARY_BLOCK, TEXT_BLOCK, block_logits

    model = models["llama"]
    hidden = torch.randn(3, model.config.hidden_size)
    blocks = {TEXT_BLOCK, BOUNDARY_BLOCK, *range(len(model.config.codecs))}
    with torch.no_grad():
        torch.testing.assert_close(block_logits(model, hidden, blocks, model.config.vocab_size), model.logits(hidden))


# ---------------------------------------------------------------------- cross-codec models


def test_cross_codec_model_reads_one_codec_and_writes_another(llm_dirs, codec_dirs):
    model = build(llm_dirs["llama"], codec_dirs, names=("patch", "patch4"), roles=["input", "output"])
    (out,) = generate(model, prompts(2)[1:], GenerateOptions(output_modality="image", temperature=1.0))
    (seg,) = out.segments
    assert seg.codec == "patch-p4-k24" and seg.shape == [2, 2] and all(0 <= t < 24 for t in seg.tokens)
    # Greedy ids equal an uncached oracle: the written codec's ids are fed back through its own E.
    recs = prompts(4)
    for rec, out in zip(recs, generate(model, recs, GenerateOptions(output_modality="image", batch_size=4))):
        assert out.segments[0].tokens == reference_image(model, model.encode_record(rec, prompt_only=True).ids)
    # What it wrote can be read back as a prompt.
    (again,) = generate(model, [Record("back", [seg, Segment("text", text="a seven")])], GenerateOptions(max_new_tokens=3))
    assert again.id == "back"
    with pytest.raises(UsageError, match="--codec patch-p2-k16: the model reads this codec but does not write it"):
        list(generate(model, prompts(1), GenerateOptions(codec="patch-p2-k16")))


def test_codec_option_picks_the_output_codec(llm_dirs, codec_dirs):
    model = build(llm_dirs["gpt2"], codec_dirs, names=("patch", "patch4"))
    for name, n in (("patch-p2-k16", 16), ("patch-p4-k24", 4)):
        (out,) = generate(model, prompts(1), GenerateOptions(output_modality="image", codec=name, temperature=1.0))
        assert out.segments[0].codec == name and len(out.segments[0].tokens) == n


# ---------------------------------------------------------------------- errors


def test_bad_inputs_and_options_are_one_line_errors(models):
    model = models["llama"]
    cases = [
        ([Record("long", [Segment("text", text="seven " * 300)])], GenerateOptions(), DataError, "record 'long'.*303 tokens.*context is 256"),
        ([Record("room", [Segment("text", text="seven " * 240)])], GenerateOptions(output_modality="image"), DataError,
         "record 'room'.*no room for the 16-id image segment"),
        ([Record("x", [Segment("image", codec="nope", tokens=[1], shape=[1])])], GenerateOptions(), DataError,
         "record 'x'.*codec 'nope' is not part of this model"),
        ([Record("y", [Segment("image", codec="patch-p2-k16", tokens=[99] * 16, shape=[4, 4])])], GenerateOptions(),
         DataError, "record 'y'.*token id 99 is out of range"),
        ([Record("e", [Segment("text", text="a", extra={"role": "target"})])], GenerateOptions(), DataError,
         "record 'e': the prompt is empty"),
        (prompts(1), GenerateOptions(top_p=0.0), UsageError, "--top-p"),
        (prompts(1), GenerateOptions(temperature=-1), UsageError, "--temperature"),
        (prompts(1), GenerateOptions(output_modality="video"), UsageError, "--output-modality video"),
        (prompts(1), GenerateOptions(codec="vqgan"), UsageError, "--codec vqgan"),
        (prompts(1), GenerateOptions(codec="mel-80-k32", output_modality="image"), UsageError, "audio codec"),
    ]
    for recs, options, kind, pattern in cases:
        with pytest.raises(kind, match=pattern) as info:
            list(generate(model, recs, options))
        assert "\n" not in str(info.value)


def test_output_modality_the_model_cannot_write(llm_dirs, codec_dirs):
    model = build(llm_dirs["llama"], codec_dirs, names=("patch",))
    with pytest.raises(UsageError, match="--output-modality audio: this model writes no audio codec"):
        list(generate(model, prompts(1), GenerateOptions(output_modality="audio")))


# ---------------------------------------------------------------------- records and the CLI


@pytest.fixture
def model_dir(llm_dirs, codec_dirs, isolated):
    """A saved model directory; its codecs also in ./codecs, where detokenize finds them by name."""
    import shutil

    for key in ("patch", "mel"):
        shutil.copytree(codec_dirs[key], isolated / "codecs" / Path(codec_dirs[key]).name)
    directory = isolated / "model"
    build(llm_dirs["llama"], codec_dirs).save(directory)
    return directory


def test_output_records_say_how_they_were_made(model_dir):
    from teal_cli.weights.digests import sha256sum
    from teal_cli.model import TealModel

    model = TealModel.from_dir(model_dir)
    rec = prompts(2)[1]
    rec.extra["label"] = 7
    rec.segments.append(Segment("text", text="reference", extra={"role": "target"}))
    options = GenerateOptions(output_modality="image", temperature=0.7, top_p=0.9, seed=3, echo=True, cfg_scale=2.0)
    (out,) = generate(model, [rec], options)
    gen = out.extra["generation"]
    assert out.id == rec.id and out.extra["label"] == 7
    assert gen["model"] == str(model_dir) and gen["adapter_sha256"] == sha256sum(model_dir / "adapter.safetensors")
    assert {k: gen[k] for k in ("seed", "temperature", "top_p", "top_k", "cfg_scale", "output_modality", "max_new_tokens")} == \
           {"seed": 3, "temperature": 0.7, "top_p": 0.9, "top_k": None, "cfg_scale": 2.0, "output_modality": "image",
            "max_new_tokens": 64}
    assert gen["teal_version"] and gen["finish"] == "segment"
    # echo: the prompt's segments (not the target), then the generated image
    assert [s.modality for s in out.segments] == ["image", "text", "image"]
    assert out.segments[1].text == rec.segments[1].text
    # the record alone reproduces the sample
    again = GenerateOptions(**{k: gen[k] for k in ("seed", "temperature", "top_p", "top_k", "cfg_scale", "output_modality",
                                                   "max_new_tokens", "codec", "max_audio_seconds")}, echo=True)
    assert next(generate(model, [rec], again)).segments == out.segments


def test_cli_needs_a_model(cli, monkeypatch):
    monkeypatch.delenv("TEAL_MODEL", raising=False)
    result = cli("generate", "--text", "hi")
    assert result.exit_code == 2
    assert "--model DIR" in result.stderr and "TEAL_MODEL" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_errors_are_one_line(cli, model_dir, monkeypatch, isolated):
    monkeypatch.setenv("TEAL_MODEL", str(model_dir))
    bad = isolated / "bad.jsonl"
    bad.write_text(json.dumps({"v": 1, "id": "q", "segments": [
        {"modality": "image", "codec": "patch-p2-k16", "tokens": [40] * 16, "shape": [4, 4]}]}) + "\n")
    for args, code, text in [
        (["generate", str(bad)], 1, "record 'q'"),
        (["generate", "--text", "seven " * 300], 1, "context is 256"),
        (["generate", "--text", "x", "--model", str(isolated / "missing")], 1, "not a model directory"),
        (["generate", "--text", "x", "--output-modality", "video"], 2, "--output-modality video"),
        (["generate", "--text", "x", "--top-p", "1.5"], 2, "--top-p"),
        (["generate", "--text", "x", "--codec", "nope"], 2, "--codec nope"),
    ]:
        result = cli(*args)
        assert result.exit_code == code, (args, result.stderr)
        assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


def test_cli_text_prompt_and_output_file(cli, model_dir, isolated):
    out = isolated / "answers.jsonl"
    result = cli("generate", "--model", model_dir, "--text", "The capital of France is", "--text", "draw a nine",
                 "--output-modality", "text", "-n", "5", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["text-0", "text-1"]
    assert all(r["segments"][0]["modality"] == "text" and r["generation"]["max_new_tokens"] == 5 for r in records)


@pytest.mark.slow  # three processes, each importing torch and transformers
def test_pipe_tokenize_generate_detokenize(model_dir, isolated):
    """The project's pipe, through real processes: the generated image decodes to a PNG."""
    from PIL import Image

    Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy()).save(isolated / "img.png")
    teal = [sys.executable, "-m", "teal_cli"]
    env = {**os.environ, "TEAL_MODEL": str(model_dir), "OMP_NUM_THREADS": "1"}
    pipe = (f"{' '.join(teal)} tokenize img.png --codec codecs/patch-p2-k16 -q | {' '.join(teal)} generate "
            f"--output-modality image -q | tee gen.jsonl | {' '.join(teal)} detokenize -o out.png -q")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipe], cwd=isolated, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in (isolated / "gen.jsonl").read_text().splitlines()]
    assert record["id"] == "img.png" and record["segments"][0]["shape"] == [4, 4]
    assert Image.open(isolated / "out.png").size == (8, 8)


# ---------------------------------------------------------------------- the real base model


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """The offline SmolLM2-135M-Instruct, converted once per pytest cache (tests/conftest.py)."""
    from teal_cli.model.llm import load_base_llm

    return load_base_llm(str(smollm2_dir))


@pytest.mark.slow
def test_smollm2_text_answers_are_the_base_models(smollm2, codec_dirs):
    from teal_cli.codecs.kmeans_codec import load_codec_dir
    from teal_cli.model import init_model

    model = init_model(smollm2, [load_codec_dir(codec_dirs["patch"])], image_size=8).eval()
    prompt = "The capital of France is"
    ids = text_ids(model, prompt)
    hf = model.llm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=8, pad_token_id=model.eos_id)[0, len(ids):].tolist()
    if model.eos_id in hf:
        hf = hf[:hf.index(model.eos_id)]
    recs = [Record("france", [Segment("text", text=prompt)]), Record("other", [Segment("text", text="One, two, three,")])]
    outs = list(generate(model, recs, GenerateOptions(max_new_tokens=8, output_modality="text", batch_size=2)))
    assert outs[0].segments[0].text == model.tokenizer.decode(hf, skip_special_tokens=True)
    assert "Paris" in outs[0].segments[0].text
