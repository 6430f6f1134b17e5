"""The model half as users break it (issue 30): generate / eval / tokenize through the CLI.

Each case gives a correct result or one line ``Error: ...`` with exit 1 (data) or 2 (usage),
no traceback, nothing damaged, and never a wrong score with exit 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tiny_teal import WORDS, make_model_dir, toy_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_half")
    make_model_dir(root, context=64)
    return root


@pytest.fixture
def model_dir(model_root, isolated):
    """A fresh copy of the tiny model directory (tests may write into it)."""
    shutil.copytree(model_root / "model", isolated / "model")
    shutil.copytree(model_root / "codecs", isolated / "codecs")
    return isolated / "model"


def one_line_error(result, code: int, *texts: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for text in texts:
        assert text in lines[0], (text, lines[0])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def image_segment(tokens, **extra):
    return {"modality": "image", "codec": "patch-p2-k16", "shape": [4, 4], "tokens": list(tokens), **extra}


# ---------------------------------------------------------------------- 1. ids of other codec weights


def _other_weights(model_dir: Path) -> str:
    weights = json.loads((model_dir / "config.json").read_text())["codecs"][0]["weights"]
    assert weights, "the tiny patch codec has a weights id"
    return ("f" if weights[0] != "f" else "0") * 16


def test_generate_refuses_ids_made_by_other_codec_weights(cli, model_dir, isolated):
    other = _other_weights(model_dir)
    prompts = write_jsonl(isolated / "p.jsonl", [{"v": 1, "id": "a", "segments": [image_segment(range(16), weights=other)]}])
    result = cli("generate", prompts, "--model", model_dir, "-n", "2")
    one_line_error(result, 1, "record 'a'", other)
    assert result.stdout == ""


def test_train_refuses_ids_made_by_other_codec_weights(cli, model_dir, isolated):
    other = _other_weights(model_dir)
    rows = [json.loads(line) for line in toy_pairs(isolated / "p.jsonl", 8).read_text().splitlines()]
    rows[3]["segments"][0]["weights"] = other
    data = write_jsonl(isolated / "d.jsonl", rows)
    before = (model_dir / "adapter.safetensors").read_bytes()
    result = cli("train", model_dir, "--data", data, "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "-q")
    one_line_error(result, 1, "d.jsonl:4", other)
    assert (model_dir / "adapter.safetensors").read_bytes() == before


# ---------------------------------------------------------------------- 2. generate --echo, scored by eval


def _word_refs(path: Path, n: int = 4) -> Path:
    """Classify references whose prompt holds the answer word: an echoed prompt scored as the
    answer would be right every time."""
    return write_jsonl(path, [{"v": 1, "id": f"r{i}", "segments": [
        {"modality": "text", "text": f"{WORDS[i % 4]} is the word"},  # prompt: unmarked beside a target
        {"modality": "text", "text": WORDS[i % 4], "role": "target"}]} for i in range(n)])


def test_echoed_prompt_is_marked_and_not_scored_as_the_answer(cli, model_dir, isolated):
    refs = _word_refs(isolated / "refs.jsonl")
    accuracy = {}
    for name, echo in (("plain", []), ("echo", ["--echo"])):
        result = cli("generate", refs, "--model", model_dir, "-n", "3", "--output-modality", "text", "-q",
                     "-o", isolated / f"{name}.jsonl", *echo)
        assert result.exit_code == 0, result.stderr
        result = cli("eval", "classify", "--predictions", isolated / f"{name}.jsonl", "--data", refs, "-q")
        assert result.exit_code == 0, result.stderr
        accuracy[name] = json.loads(result.stdout)["metrics"]["accuracy"]
    echoed = [json.loads(line) for line in (isolated / "echo.jsonl").read_text().splitlines()]
    assert all(r["segments"][0]["role"] == "prompt" and r["segments"][0]["text"].endswith("is the word") for r in echoed)
    assert all("role" not in s for r in echoed for s in r["segments"][1:])
    assert accuracy["plain"] < 1.0  # the random model does not say the words
    assert accuracy["echo"] == accuracy["plain"]


# ---------------------------------------------------------------------- 3. segments near the end of the context


def _prompt_with_room(model, low: int, high: int):
    """A text prompt leaving between ``low`` and ``high`` tokens of the context."""
    from teal_cli.records import Record, Segment

    for n in range(1, 200):
        rec = Record(id="p", segments=[Segment("text", text=" ".join(["seven"] * n))])
        room = model.context_length - len(model.encode_record(rec, prompt_only=True).ids)
        if low <= room <= high:
            return rec, room
    raise AssertionError("no prompt length fits")


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_a_segment_opened_near_the_end_of_the_context_completes(model_dir, monkeypatch, modality):
    """The model is made to open a segment whenever it may: every segment it writes is whole
    (image: exactly H*W ids and a shape; audio: closed), and generation ends at the context."""
    import teal_cli.model.generate as G
    from teal_cli.model import TealModel

    model = TealModel.from_dir(model_dir)
    open_id = model.config.boundary_id(modality)
    plain = G.block_logits

    def eager_to_open(model, hidden, blocks, vocab_size):
        logits = plain(model, hidden, blocks, vocab_size)
        logits[:, open_id] += 1e4
        return logits

    monkeypatch.setattr(G, "block_logits", eager_to_open)
    rec, room = _prompt_with_room(model, 25, 30)  # one 18-token image fits, a second does not
    options = G.GenerateOptions(max_new_tokens=60, max_audio_seconds=100)
    (out,) = G.generate(model, [rec], options)
    assert out.extra["generation"]["finish"] == "context"
    media = [s for s in out.segments if s.modality == modality]
    assert media, out.segments
    if modality == "image":
        assert len(media) == 1 and media[0].shape == [4, 4] and len(media[0].tokens) == 16
    else:
        grammar = G.Grammar(model, options)
        (gen,) = G.generate_ids(model, [model.encode_record(rec, prompt_only=True).ids], options, grammar)
        assert len(gen.ids) == room and gen.ids[-1] == open_id + 1  # the last token closes the segment
        assert gen.ids.count(open_id) == gen.ids.count(open_id + 1)


# ---------------------------------------------------------------------- 9. numbers; 12. output paths


def usage_error(result, *texts: str) -> None:
    """Exit 2 and one ``Error:`` line (click's range errors add its two usage lines above it)."""
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for text in texts:
        assert text in errors[0], (text, errors[0])


@pytest.mark.parametrize("args", [
    ["generate", "--text", "x", "--temperature", "nan"], ["generate", "--text", "x", "--temperature", "inf"],
    ["generate", "--text", "x", "--top-p", "nan"], ["generate", "--text", "x", "--top-p", "0"],
    ["generate", "--text", "x", "--cfg-scale", "inf"], ["generate", "--text", "x", "--max-audio-seconds", "nan"],
    ["generate", "--text", "x", "--max-audio-seconds", "inf"], ["generate", "--text", "x", "--seed", str(2**70)],
    ["generate", "--text", "x", "--seed", "-1"],
    ["eval", "classify", "--data", "refs.jsonl", "--temperature", "nan"],
    ["eval", "classify", "--data", "refs.jsonl", "--top-p", "inf"],
    ["eval", "classify", "--data", "refs.jsonl", "--cfg-scale", "nan"],
    ["eval", "classify", "--data", "refs.jsonl", "--cfg-scale", "-1"],
    ["eval", "ppl", "--data", "refs.jsonl", "--seed", str(2**64)],
    ["tokenize", "x.png", "--codec", "codecs/patch-p2-k16", "--sample-temperature", "inf"],
    ["tokenize", "x.png", "--codec", "codecs/patch-p2-k16", "--sample-temperature", "nan"],
    ["tokenize", "x.png", "--codec", "codecs/patch-p2-k16", "--image-size", "100000000"],
])
def test_numeric_options_are_usage_errors_before_any_model_loads(cli, isolated, args):
    _word_refs(isolated / "refs.jsonl")
    option = next(a for a in args if a.startswith("--") and a not in ("--text", "--data", "--codec"))
    model = ["--model", str(isolated / "no-model")] if args[0] != "tokenize" else []
    usage_error(cli(*args, *model), option)


def test_max_audio_seconds_1e308_is_bounded_by_the_context(cli, model_dir, isolated):
    result = cli("generate", "--model", model_dir, "--text", "say", "--output-modality", "audio", "--max-audio-seconds", "1e308",
                 "-q")
    assert result.exit_code == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["segments"][0]["modality"] == "audio" and record["generation"]["finish"] in ("segment", "context")


def test_bad_output_paths_are_refused_before_any_work(cli, model_dir, isolated):
    refs = _word_refs(isolated / "refs.jsonl")
    (isolated / "a-file").write_text("keep me\n")
    (isolated / "a-folder").mkdir()
    write_jsonl(isolated / "preds.jsonl", [{"v": 1, "id": f"r{i}", "segments": [{"modality": "text", "text": "zero"}]}
                                          for i in range(4)])
    for args, text in [
        (["generate", "--model", model_dir, "--text", "x", "-o", "a-folder"], "is a folder"),
        (["generate", "--model", model_dir, "--text", "x", "-o", "a-file/out.jsonl"], "a-file is a file"),
        (["eval", "classify", "--predictions", "preds.jsonl", "--data", refs, "--report", "a-file"], "--report a-file: is a file"),
        (["eval", "classify", "--predictions", "preds.jsonl", "--data", refs, "-o", "a-folder"], "is a folder"),
        (["eval", "classify", "--model", model_dir, "--data", refs, "-o", "a-file/x/r.json"], "a-file is a file"),
        (["tokenize", "x.png", "--codec", "codecs/patch-p2-k16", "-o", "a-file/t.jsonl"], "a-file is a file"),
        (["tokenize", "x.png", "--codec", "codecs/patch-p2-k16", "-o", "a-file/{id}.jsonl"], "is a file"),
        (["detokenize", "preds.jsonl", "-o", "a-file/{id}.png"], "is a file"),
        (["detokenize", "preds.jsonl", "-o", "a-file/sub/"], "a-file is a file"),
    ]:
        one_line_error(cli(*args), 2, text)
    assert (isolated / "a-file").read_text() == "keep me\n" and not any((isolated / "a-folder").iterdir())


# ---------------------------------------------------------------------- 13. tokenize keeps a segment's keys


def test_tokenize_keeps_media_segments_own_keys_and_manifest_keys(cli, model_dir, isolated):
    import numpy as np
    from PIL import Image

    Image.fromarray((np.arange(8 * 8 * 3) % 251).astype("uint8").reshape(8, 8, 3)).save(isolated / "img.png")
    write_jsonl(isolated / "m.jsonl", [
        {"id": "a", "task": "text-to-image", "segments": [
            {"modality": "text", "text": "draw it", "role": "prompt"},
            {"modality": "image", "path": "img.png", "role": "target", "speaker": "s1", "lang": "en"}]},
        {"id": "b", "image": "img.png", "text": "a picture", "label": "cat", "split": 3}])
    result = cli("tokenize", "m.jsonl", "--codec", "codecs/patch-p2-k16", "-q")
    assert result.exit_code == 0, result.stderr
    a, b = [json.loads(line) for line in result.stdout.splitlines()]
    image = a["segments"][1]
    assert image["tokens"] and image["role"] == "target" and image["speaker"] == "s1" and image["lang"] == "en"
    assert a["task"] == "text-to-image" and a["segments"][0]["role"] == "prompt"
    assert b["label"] == "cat" and b["split"] == 3 and [s["modality"] for s in b["segments"]] == ["image", "text"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_records_are_one_line_errors(cli, isolated, value):
    (isolated / "refs.jsonl").write_text('{"v": 1, "id": "r0", "label": %s, "segments": [{"modality": "text", "text": "a"}, '
                                         '{"modality": "text", "text": "seven"}]}\n' % value)
    write_jsonl(isolated / "preds.jsonl", [{"v": 1, "id": "r0", "segments": [{"modality": "text", "text": "nan"}]}])
    one_line_error(cli("eval", "classify", "--predictions", "preds.jsonl", "--data", "refs.jsonl"), 1, "refs.jsonl:1",
                   "invalid JSON")


def test_a_label_that_is_not_a_string_or_integer_is_refused(cli, isolated):
    write_jsonl(isolated / "refs.jsonl", [{"v": 1, "id": "r0", "label": [7], "segments": [
        {"modality": "text", "text": "a"}, {"modality": "text", "text": "seven"}]}])
    write_jsonl(isolated / "preds.jsonl", [{"v": 1, "id": "r0", "segments": [{"modality": "text", "text": "[7]"}]}])
    one_line_error(cli("eval", "classify", "--predictions", "preds.jsonl", "--data", "refs.jsonl"), 1, "record 'r0'",
                   "not a string or an integer")


# ---------------------------------------------------------------------- 10. nothing to score; 11. ppl and the context


def last_line_error(result, code: int, *texts: str) -> None:
    """Exit ``code``; the last stderr line is the one ``Error:`` (``skipped:`` warnings may precede it)."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and sum(line.startswith("Error: ") for line in result.stderr.splitlines()) == 1
    for text in texts:
        assert text in last, (text, last)


@pytest.mark.parametrize("task", ["caption", "mcq", "asr", "classify", "gen"])
def test_empty_references_are_an_error_not_a_score(cli, isolated, task):
    (isolated / "refs.jsonl").write_text("")
    (isolated / "preds.jsonl").write_text("")
    result = cli("eval", task, "--predictions", "preds.jsonl", "--data", "refs.jsonl")
    one_line_error(result, 1, "refs.jsonl", "nothing to score")
    assert result.stdout == ""


def test_empty_references_for_ppl_and_recon_are_an_error(cli, model_dir, isolated):
    (isolated / "refs.jsonl").write_text("\n")
    one_line_error(cli("eval", "ppl", "--model", model_dir, "--data", "refs.jsonl"), 1, "nothing to score")
    one_line_error(cli("eval", "recon", "--codec", "codecs/patch-p2-k16", "--data", "refs.jsonl"), 1, "nothing to score")


@pytest.mark.parametrize("task", ["caption", "asr", "classify", "mcq"])
def test_every_reference_skipped_is_an_error(cli, isolated, task):
    write_jsonl(isolated / "refs.jsonl", [{"v": 1, "id": f"r{i}", "segments": [
        {"modality": "text", "text": "a"}, image_segment(range(16))]} for i in range(3)])  # no text target
    write_jsonl(isolated / "preds.jsonl", [{"v": 1, "id": f"r{i}", "segments": [{"modality": "text", "text": "a"}]}
                                          for i in range(3)])
    result = cli("eval", task, "--predictions", "preds.jsonl", "--data", "refs.jsonl", "--on-error", "skip")
    last_line_error(result, 1, "nothing to score")
    assert result.stdout == ""


def _long_and_short(path: Path) -> Path:
    return write_jsonl(path, [
        {"v": 1, "id": "short", "segments": [{"modality": "text", "text": "one"}, {"modality": "text", "text": "two"}]},
        {"v": 1, "id": "long", "segments": [{"modality": "text", "text": "seven " * 80}, {"modality": "text", "text": "two"}]}])


def test_ppl_refuses_records_longer_than_the_context(cli, model_dir, isolated):
    refs = _long_and_short(isolated / "refs.jsonl")
    one_line_error(cli("eval", "ppl", "--model", model_dir, "--data", refs), 1, "refs.jsonl", "record 'long'",
                   "context of 64")
    result = cli("eval", "ppl", "--model", model_dir, "--data", refs, "--on-error", "skip")
    assert result.exit_code == 1 and "Traceback" not in result.stderr and "record 'long'" in result.stderr
    out = json.loads(result.stdout)
    assert out["counts"]["records"] == 2 and out["counts"]["skipped"] == 1 and out["metrics"]["perplexity"] >= 1


def test_eval_model_skips_a_prompt_longer_than_the_context(cli, model_dir, isolated):
    refs = _long_and_short(isolated / "refs.jsonl")
    one_line_error(cli("eval", "classify", "--model", model_dir, "--data", refs, "--max-new-tokens", "2", "-q"), 1,
                   "refs.jsonl", "record 'long'")
    result = cli("eval", "classify", "--model", model_dir, "--data", refs, "--max-new-tokens", "2", "--on-error", "skip")
    assert result.exit_code == 1 and "Traceback" not in result.stderr and "record 'long'" in result.stderr
    out = json.loads(result.stdout)
    assert out["counts"]["scored"] == 1 and out["counts"]["bad"] == 1 and out["counts"]["missing"] == 0


# ---------------------------------------------------------------------- 7. the report


def test_report_tolerates_a_torn_metrics_line_and_results_come_first(cli, isolated):
    refs = _word_refs(isolated / "refs.jsonl")
    write_jsonl(isolated / "preds.jsonl", [{"v": 1, "id": f"r{i}", "segments": [{"modality": "text", "text": WORDS[i]}]}
                                          for i in range(4)])
    rows = "".join(json.dumps({"step": s, "loss": 3.0 / (s + 1), "lr": 1e-3}) + "\n" for s in range(30))
    (isolated / "metrics.jsonl").write_text(rows + '{"step": 30, "lo')
    result = cli("eval", "classify", "--predictions", "preds.jsonl", "--data", refs, "--report", "rep",
                 "--curves", "metrics.jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["metrics"]["accuracy"] == 1.0
    assert (isolated / "rep" / "curves.png").stat().st_size > 0
    # a damaged line before the last fails the report, but the results are already written
    (isolated / "metrics.jsonl").write_text('{"step": 0, "lo\n' + rows)
    result = cli("eval", "classify", "--predictions", "preds.jsonl", "--data", refs, "--report", "rep2",
                 "--curves", "metrics.jsonl", "-o", "results.json")
    one_line_error(result, 1, "metrics.jsonl:1")
    assert json.loads((isolated / "results.json").read_text())["metrics"]["accuracy"] == 1.0


def test_a_report_written_again_leaves_no_stale_pictures(cli, isolated):
    refs = _word_refs(isolated / "refs.jsonl")
    write_jsonl(isolated / "preds.jsonl", [{"v": 1, "id": f"r{i}", "segments": [{"modality": "text", "text": WORDS[i]}]}
                                          for i in range(4)])
    (isolated / "rep").mkdir()
    (isolated / "rep" / "notes.txt").write_text("mine\n")
    assert cli("eval", "classify", "--predictions", "preds.jsonl", "--data", refs, "--report", "rep", "-q").exit_code == 0
    assert (isolated / "rep" / "confusion.png").exists()
    assert cli("eval", "asr", "--predictions", "preds.jsonl", "--data", refs, "--report", "rep", "-q").exit_code == 0
    assert sorted(p.name for p in (isolated / "rep").iterdir()) == ["index.html", "notes.txt", "teal-report.json"]


def test_smoothed_curve_follows_the_trend_without_start_up_bias():
    from teal_cli.evaluate.report import smoothed

    assert smoothed([2.0] * 5) == pytest.approx([2.0] * 5)
    noisy = [1.0 + (0.5 if i % 2 else -0.5) for i in range(40)]
    assert max(abs(v - 1.0) for v in smoothed(noisy)[10:]) < 0.1


# ---------------------------------------------------------------------- special strings in text


def test_special_strings_in_text_are_plain_text(model_dir):
    from teal_cli.model import TealModel
    from teal_cli.records import Record, Segment

    model = TealModel.from_dir(model_dir)
    eos = model.tokenizer.eos_token
    rec = Record("r", [Segment("text", text="say", extra={"role": "prompt"}),
                       Segment("text", text=f"seven {eos} and more", extra={"role": "target"})])
    enc = model.encode_record(rec)
    assert enc.ids.count(model.eos_id) == 1 and enc.ids[-1] == model.eos_id  # only the EOS teal adds after the target
    assert model.tokenizer.decode(model.text_ids(f"a {eos} b")) == f"a {eos} b"


def test_generate_says_when_a_record_without_roles_is_a_prompt_as_a_whole(cli, model_dir, isolated):
    refs = write_jsonl(isolated / "refs.jsonl", [
        {"v": 1, "id": f"r{i}", "segments": [image_segment(range(16)), {"modality": "text", "text": WORDS[i]}]}
        for i in range(2)])
    result = cli("generate", refs, "--model", model_dir, "-n", "2", "--output-modality", "text")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1 and "record 'r0'" in warnings[0] and '"role": "target"' in warnings[0]
    # a single segment (what 'teal tokenize img.png' pipes in) is a prompt without a word said
    single = write_jsonl(isolated / "one.jsonl", [{"v": 1, "id": "img.png", "segments": [image_segment(range(16))]}])
    result = cli("generate", single, "--model", model_dir, "-n", "2", "--output-modality", "text")
    assert result.exit_code == 0 and "Warning" not in result.stderr
