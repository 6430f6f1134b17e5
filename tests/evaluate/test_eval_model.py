"""teal eval --model: generation through teal_cli.model.generate, and ppl, on a tiny random model."""

from __future__ import annotations

import json
import math
import pytest
import torch

from teal_cli.records import Record, Segment
from tiny_llm import make_tiny_llm

DIGITS = "zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from teal_cli.codecs.kmeans_codec import load_codec_dir, save_codec_dir
    from teal_cli.features.patch import PatchFeatures
    from teal_cli.model import init_model
    from teal_cli.model.llm import load_base_llm

    root = tmp_path_factory.mktemp("evalmodel")
    gen = torch.Generator().manual_seed(0)
    codec = save_codec_dir(root / "codecs" / "patch-p2-k16", PatchFeatures(2, image_size=8), torch.rand(16, 12, generator=gen), {})
    llm = make_tiny_llm(root / "llm", "llama")
    model = init_model(load_base_llm(str(llm)), [load_codec_dir(codec)], image_size=8, codec_paths=[str(codec)])
    model.save(root / "model")
    with open(root / "model" / "metrics.jsonl", "w") as f:
        for s in range(5):
            f.write(json.dumps({"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-3}) + "\n")
    return root


def _refs(path, n=6):
    rows = [{"id": f"r{i}", "segments": [{"modality": "text", "text": f"a handwritten {DIGITS[i % 10]}", "role": "prompt"},
                                         {"modality": "text", "text": DIGITS[i % 10], "role": "target"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_eval_with_model_generates_and_scores(cli, model_dir, tmp_path, monkeypatch):
    refs = _refs(tmp_path / "ref.jsonl")
    r = cli("eval", "classify", "--model", model_dir / "model", "--data", refs, "--max-new-tokens", "4",
            "--report", "rep", "-q")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["counts"]["scored"] == 6 and out["settings"]["source"].startswith("model ")
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0
    assert (tmp_path / "rep" / "curves.png").is_file()  # the model directory's metrics.jsonl
    # the same predictions as teal_cli.model.generate gives for the prompts alone
    from teal_cli.evaluate.modeling import generate_predictions, load_model, prompts_of
    from teal_cli.model.generate import GenerateOptions

    model = load_model(str(model_dir / "model"), "cpu", None)
    from teal_cli.evaluate.pairs import read_file

    records = read_file(str(refs))
    preds = generate_predictions(model, records, GenerateOptions(max_new_tokens=4, output_modality="text", batch_size=16))
    assert [p.id for p in preds] == [r.id for r in records]
    assert all(s.extra.get("role") != "target" for p in prompts_of(records) for s in p.segments)
    assert all(len(p.segments) == 1 for p in prompts_of(records))
    # gen with --model: image segments, decoded by the model's codec and judged
    monkeypatch.setenv("TEAL_CODEC_PATH", str(model_dir / "codecs"))
    r = cli("eval", "gen", "--model", model_dir / "model", "--data", refs, "-q")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["counts"]["scored"] == 6 and out["counts"]["no_image"] == 0


def test_eval_decodes_as_asked_and_records_it(cli, model_dir, tmp_path, monkeypatch):
    """--temperature/--top-k/--top-p/--cfg-scale/--seed reach teal_cli.model.generate and the
    results' settings; a bad value is refused before the model loads."""
    import teal_cli.evaluate.modeling as modeling

    seen = []
    real = modeling.generate_predictions
    monkeypatch.setattr(modeling, "generate_predictions",
                        lambda model, refs, options=None, template=None, **kw: seen.append(options) or real(model, refs, options, template, **kw))
    monkeypatch.setenv("TEAL_CODEC_PATH", str(model_dir / "codecs"))
    refs = _refs(tmp_path / "ref.jsonl", n=4)
    args = ("eval", "gen", "--model", model_dir / "model", "--data", refs, "--temperature", "0.7", "--top-k", "5",
            "--top-p", "0.9", "--cfg-scale", "2", "--seed", "3", "-q")
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.stderr
    assert first.stdout == second.stdout  # seeded sampling is reproducible
    o = seen[0]
    assert (o.temperature, o.top_k, o.top_p, o.cfg_scale, o.seed, o.output_modality) == (0.7, 5, 0.9, 2.0, 3, "image")
    decoding = json.loads(first.stdout)["settings"]["decoding"]
    assert decoding == {"template": None, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "cfg_scale": 2.0, "seed": 3}
    r = cli("eval", "gen", "--model", tmp_path / "no-such-model", "--data", refs, "--top-p", "1.5")
    assert r.exit_code == 2 and "--top-p 1.5" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ppl_equals_cross_entropy_of_the_model(cli, model_dir, tmp_path):
    from teal_cli.evaluate.modeling import load_model

    records = [Record(f"h{i}", [Segment("text", text=f"draw a {DIGITS[i]}", extra={"role": "prompt"}),
                                Segment("image", codec="patch-p2-k16", tokens=[(3 * i + j) % 16 for j in range(16)], shape=[4, 4],
                                        extra={"role": "target"})]) for i in range(3)]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(r.dumps() + "\n" for r in records))
    r = cli("eval", "ppl", "--model", model_dir / "model", "--data", path, "--batch-size", "2", "-q")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    model = load_model(str(model_dir / "model"), "cpu", None)
    losses, mods = [], []
    for rec in records:  # one record at a time, no padding: an independent computation
        enc = model.encode_record(rec)
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids)).logits[0].float()
        ce = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        for t in range(1, len(enc.ids)):
            if enc.target[t]:
                losses.append(float(ce[t - 1]))
                mods.append(enc.modality[t])
    assert out["counts"]["target_tokens"] == len(losses)
    assert out["metrics"]["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert out["metrics"]["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    image = [l for l, m in zip(losses, mods) if m == "image"]
    assert out["metrics"]["image_loss"] == pytest.approx(sum(image) / len(image), abs=1e-4)
