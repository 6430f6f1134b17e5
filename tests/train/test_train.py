"""teal train: both stages on tiny models, what trains and what stays bit-identical, data checks,
exact resume, templates, LoRA, the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_teal import WORDS, make_model_dir, toy_captions, toy_pairs  # noqa: E402

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-models")
    return {"small": make_model_dir(root / "small"), "learn": make_model_dir(root / "learn", hidden=64, audio=False)}


@pytest.fixture
def model_dir(model_store, tmp_path):
    return Path(shutil.copytree(model_store["small"], tmp_path / "run"))


@pytest.fixture
def learn_dir(model_store, tmp_path):
    return Path(shutil.copytree(model_store["learn"], tmp_path / "learn"))


def options(data, **kw):
    from teal_cli.train import TrainOptions

    base = dict(data=str(data), batch_size=8, max_steps=6, lr=1e-2, device="cpu", checkpoint_every=0)
    base.update(kw)
    return TrainOptions(**base)


def adapter(directory):
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter.safetensors"))


def digest(directory):
    out = {}
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------- templates and data


def test_builtin_templates_have_ten_prompts_per_task_and_a_file_replaces_them(tmp_path):
    from teal_cli.errors import DataError
    from teal_cli.train.templates import BUILTIN, load_templates

    assert set(BUILTIN) >= {"caption", "asr", "text-to-image", "text-to-speech", "mcq"}
    for task, prompts in BUILTIN.items():
        assert len(prompts) >= 10 and len(set(prompts)) == len(prompts), task
        assert all(p.count("{input}") <= 1 for p in prompts)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"caption": ["Say: {input}"], "count": ["How many? {input}"]}))
    loaded = load_templates(path)
    assert loaded["caption"] == ["Say: {input}"] and loaded["count"] == ["How many? {input}"] and loaded["asr"] == BUILTIN["asr"]
    path.write_text(json.dumps({"caption": []}))
    with pytest.raises(DataError, match="t.json: task 'caption'"):
        load_templates(path)


def test_render_wraps_the_prompt_segments_and_keeps_the_target_last():
    from teal_cli.records import Record, Segment
    from teal_cli.train.templates import render

    rec = Record(id="a", segments=[Segment("image", codec="c", tokens=[1, 2]), Segment("text", text="seven")])
    out = render(rec, "Look: {input}\nAnswer:", ["prompt", "target"])
    assert [(s.modality, s.text, s.extra["role"]) for s in out.segments] == [
        ("text", "Look: ", "prompt"), ("image", None, "prompt"), ("text", "\nAnswer:", "prompt"), ("text", "seven", "target")]
    out = render(rec, "Describe.", ["prompt", "target"])
    assert [s.text for s in out.segments] == ["Describe.", None, "seven"]


def test_stage1_makes_both_directions_and_epoch_order_is_a_pure_function_of_seed_and_epoch(model_dir, tmp_path):
    import numpy as np

    from teal_cli.model import TealModel
    from teal_cli.train.data import DataOptions, SampleSet

    data = toy_pairs(tmp_path / "p.jsonl", 24)
    model = TealModel.from_dir(model_dir)
    a = SampleSet.scan(data, model, DataOptions(stage=1, seed=3))
    b = SampleSet.scan(data, model, DataOptions(stage=1, seed=3))
    assert len(a) == 48 and a.n_records == 24
    first, second = a.encode([0, 1], 0)
    # [image][text]: the loss is on the text (and EOS); [text][image]: on the image and its closer.
    boundary = model.config.boundary_id("image")
    assert first.ids[first.target.index(True) - 1] == boundary + 1 and first.ids[-1] == model.eos_id
    assert second.ids[second.target.index(True)] == boundary and all(second.target[second.target.index(True):])
    for epoch in (0, 1):
        assert [x.tolist() for x in a.epoch_batches(epoch, 8)] == [x.tolist() for x in b.epoch_batches(epoch, 8)]
    e0, e1 = a.epoch_batches(0, 8), a.epoch_batches(1, 8)
    assert [x.tolist() for x in e0] != [x.tolist() for x in e1]
    flat = np.concatenate(e0)
    assert len(flat) == len(set(flat.tolist())) == 48
    # Length bucketing: the two directions have different lengths; batches do not mix them much.
    spread = [int(np.ptp(a.length[x])) for x in e0]
    assert sum(spread) < sum(int(np.ptp(a.length[x])) for x in a.epoch_batches(0, 8, bucket=False))
    train, val = a.split(0.25, seed=3)
    assert val.n_records == 24 and len(val) == 12 and len(train) == 36
    assert not set(train.record.tolist()) & set(val.record.tolist())


@pytest.mark.parametrize("case", ["codec", "range", "long", "empty", "json", "pair"])
def test_bad_data_fails_before_the_first_step_naming_file_and_line(model_dir, tmp_path, case):
    from teal_cli.errors import DataError
    from teal_cli.train import train

    path = toy_pairs(tmp_path / "bad.jsonl", 6)
    lines = path.read_text().splitlines()
    bad = json.loads(lines[3])
    expect = "bad.jsonl:4"
    if case == "codec":
        bad["segments"][0]["codec"] = "patch-p9-k1"
    elif case == "range":
        bad["segments"][0]["tokens"][5] = 16
    elif case == "long":
        bad["segments"][1]["text"] = "seven " * 300
    elif case == "pair":
        bad["segments"].append({"modality": "text", "text": "more"})
    lines[3] = json.dumps(bad)
    if case == "json":
        lines[3] = lines[3][:-3]
    path.write_text("" if case == "empty" else "\n".join(lines) + "\n")
    if case == "empty":
        expect = "bad.jsonl: no records"
    before = digest(model_dir)
    with pytest.raises(DataError) as info:
        train(model_dir, options(path, stage=1))
    message = str(info.value)
    assert expect in message and "\n" not in message
    assert {"codec": "not part of this model", "range": "out of range", "long": "context", "pair": "pair records",
            "json": "invalid JSON", "empty": "empty"}[case] in message
    assert digest(model_dir) == before


# ---------------------------------------------------------------------- what trains


def test_stage1_trains_only_the_projections(model_dir, tmp_path):
    from teal_cli.model import TealModel
    from teal_cli.train import train

    before = adapter(model_dir)
    base = {k: v.clone() for k, v in TealModel.from_dir(model_dir).base_parameters().items()}
    result = train(model_dir, options(toy_pairs(tmp_path / "p.jsonl", 24), stage=1))
    after = adapter(model_dir)
    assert result.trainable == ["proj"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".proj_in." in k or ".proj_out." in k for k in changed)
    assert any("proj_in" in k for k in changed) and any("proj_out" in k for k in changed)
    for k in before:
        if ".proj_" not in k:
            assert torch.equal(before[k], after[k]), k
    trained = result.model.base_parameters()
    assert set(trained) == set(base) and all(torch.equal(trained[k], base[k]) for k in base)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["history"][-1]["stage"] == 1 and cfg["history"][-1]["steps"] == 6
    assert cfg["history"][-1]["trainable"] == ["proj"] and cfg["history"][-1]["data"].endswith("p.jsonl")
    lines = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 7))
    assert all({"lr", "tokens_per_s", "loss_text", "loss_image"} <= set(x) for x in steps)
    assert "val_loss" in lines[-1]


def test_stage2_adds_bias_norm_trains_every_non_textual_part_and_keeps_base_weights(model_dir, tmp_path):
    from teal_cli.model import TealModel
    from teal_cli.train import train

    base = {k: v.clone() for k, v in TealModel.from_dir(model_dir).base_parameters().items()}
    before = adapter(model_dir)
    result = train(model_dir, options(toy_captions(tmp_path / "s.jsonl", 24), stage=2, bias_norm="scale"))
    assert result.trainable == ["proj", "embed", "output", "boundary", "bias_norm"]
    trained = result.model.base_parameters()
    assert set(trained) == set(base) and all(torch.equal(trained[k], base[k]) for k in base)
    after = adapter(model_dir)
    assert any("teal_scale" in k for k in after) and any("teal_norm_weight" in k for k in after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"boundary_in", "boundary_out", "heads.codec0.embedding"} <= changed
    # Caption targets are text: under the segment grammar no image id competes with them, so O
    # (scored only inside image segments) gets no gradient and stays as it was.
    assert "heads.codec0.output" not in changed
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["groups"]["bias_norm"] == "scale" and cfg["trainable"] == result.trainable
    # The directory rebuilds the trained model (bias-norm included): same logits.
    reloaded = TealModel.from_dir(model_dir)
    ids = torch.tensor([reloaded.encode_record(_caption_prompt(0)).ids])
    assert torch.equal(reloaded(ids).logits, result.model(ids).logits)


def test_freeze_and_train_pick_groups_for_ablations(model_dir, tmp_path):
    from teal_cli.errors import UsageError
    from teal_cli.train import train

    data = toy_captions(tmp_path / "s.jsonl", 24)
    result = train(model_dir, options(data, stage=2, freeze=["bias_norm", "embed"], max_steps=2))
    assert result.trainable == ["proj", "output", "boundary"]
    assert json.loads((model_dir / "config.json").read_text())["groups"]["bias_norm"] is None
    with pytest.raises(UsageError, match="group 'heads'"):
        train(model_dir, options(data, stage=2, train=["heads"]))
    with pytest.raises(UsageError, match="--lora R"):
        train(model_dir, options(data, stage=2, train=["lora"]))


def test_lora_starts_as_the_identity_trains_and_rebuilds(model_dir, tmp_path):
    from teal_cli.model import TealModel
    from teal_cli.model.lora import add_lora, lora_config
    from teal_cli.train import train

    model = TealModel.from_dir(model_dir)
    ids = torch.tensor([model.encode_record(_caption_prompt(1)).ids])
    plain = model(ids).logits
    add_lora(model, lora_config(4))
    assert torch.equal(model(ids).logits, plain)
    assert any("lora_A" in k for k in model.adapter_state_dict())
    assert model.llm.get_input_embeddings().weight.requires_grad is False

    base = {k: v.clone() for k, v in TealModel.from_dir(model_dir).base_parameters().items()}
    result = train(model_dir, options(toy_captions(tmp_path / "s.jsonl", 24), stage=2, lora=4))
    assert result.trainable == ["proj", "embed", "output", "boundary", "lora"]
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["groups"]["lora"]["r"] == 4 and cfg["groups"]["bias_norm"] is None
    lora_b = [v for k, v in adapter(model_dir).items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    trained = {k.replace(".base_layer.", "."): v for k, v in result.model.base_parameters().items()}
    assert set(trained) == set(base) and all(torch.equal(trained[k], base[k]) for k in base)
    reloaded = TealModel.from_dir(model_dir)
    assert torch.equal(reloaded(ids).logits, result.model(ids).logits)


def test_gradient_accumulation_gives_the_same_steps(model_dir, tmp_path):
    from teal_cli.train import train

    data = toy_pairs(tmp_path / "p.jsonl", 24)
    other = Path(shutil.copytree(model_dir, tmp_path / "other"))
    one = train(model_dir, options(data, stage=1, max_steps=3))
    two = train(other, options(data, stage=1, max_steps=3, grad_accum=2))
    assert one.losses == pytest.approx(two.losses, rel=1e-4)


# ---------------------------------------------------------------------- learning


def _caption_prompt(label, template="{input}\nDescribe this image in a few words:"):
    import random

    from teal_cli.records import Record, Segment
    from teal_cli.train.templates import render
    from tiny_teal import image_tokens

    rec = Record(id=str(label), segments=[
        Segment("image", codec="patch-p2-k16", tokens=image_tokens(label, random.Random(100 + label)), shape=[4, 4]),
        Segment("text", text=WORDS[label])])
    return render(rec, template, ["prompt", "target"])


def test_both_stages_lower_the_loss_and_stage2_answers_the_toy_task_through_generate(learn_dir, tmp_path):
    """The toy task: 16 patch ids drawn from class k's four ids -> the word for k (4 classes).
    Stage 1 (projections only, 40 steps) must lower the loss by a fifth; stage 2 (80 CPU steps,
    batch 16) must bring the held-out loss under 0.5 nats a token and answer through generate."""
    from teal_cli.model.generate import GenerateOptions, generate
    from teal_cli.train import train

    first = train(learn_dir, options(toy_pairs(tmp_path / "p.jsonl", 64), stage=1, max_steps=40, batch_size=16, lr=3e-2))
    # Under the segment grammar the loss starts near ln 16 per image id (not over the joint
    # vocabulary); the image half's floor is ln 4 (ids drawn from the class's four).
    assert first.val_loss < 0.8 * first.losses[0], (first.losses[::10], first.val_loss)
    second = train(learn_dir, options(toy_captions(tmp_path / "s.jsonl", 64), stage=2, max_steps=80, batch_size=16, lr=3e-2))
    assert second.losses[-1] < 0.5 and second.val_loss < 0.5, (second.losses[::10], second.val_loss)
    model = second.model
    prompts = [_caption_prompt(k) for k in range(4)]
    answers = [r.segments[0].text.strip() for r in generate(model, prompts, GenerateOptions(max_new_tokens=6))]
    assert sum(a == w for a, w in zip(answers, WORDS)) >= 3, answers


# ---------------------------------------------------------------------- checkpoints and resume


def test_stop_and_resume_reproduce_the_uninterrupted_losses_exactly(model_dir, tmp_path):
    from teal_cli.errors import UsageError
    from teal_cli.train import Trainer, train

    data = toy_captions(tmp_path / "s.jsonl", 24)
    other = Path(shutil.copytree(model_dir, tmp_path / "other"))
    opts = options(data, stage=2, max_steps=9, checkpoint_every=4, batch_size=4)
    whole = train(other, opts)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model_dir, opts, stop_after=6).run()
    assert (model_dir / "checkpoints" / "latest").read_text().startswith("step-00000006-")
    assert json.loads((model_dir / "config.json").read_text())["history"] == []  # DIR itself untouched until the end
    with pytest.raises(UsageError, match="--resume"):
        train(model_dir, opts)
    with pytest.raises(UsageError, match="batch_size"):
        train(model_dir, options(data, stage=2, max_steps=9, checkpoint_every=4, batch_size=8), resume=True)
    resumed = train(model_dir, opts, resume=True)
    assert resumed.losses == whole.losses  # bit-identical on the CPU
    assert resumed.val_loss == whole.val_loss
    for k, v in adapter(other).items():
        assert torch.equal(v, adapter(model_dir)[k]), k
    steps = [json.loads(x)["step"] for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10)) + [9]
    assert [p.name for p in (model_dir / "checkpoints").iterdir() if p.is_dir()] == [
        (model_dir / "checkpoints" / "latest").read_text().strip()]


# ---------------------------------------------------------------------- the CLI


def test_cli_trains_and_reports_bad_data_in_one_line(model_dir, tmp_path):
    from typer.testing import CliRunner

    from teal_cli.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"]).output
    assert "Examples:" in help_text and "--resume" in help_text and "torchrun" in help_text
    data = toy_pairs(tmp_path / "p.jsonl", 16)
    result = runner.invoke(app, ["train", str(model_dir), "--data", str(data), "--max-steps", "2", "--batch-size", "4",
                                 "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(model_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n{\"v\": 1, \"id\": \"x\", \"segments\": [{\"modality\": \"image\", "
                   "\"codec\": \"nope\", \"tokens\": [1]}, {\"modality\": \"text\", \"text\": \"a\"}]}\n")
    result = runner.invoke(app, ["train", str(model_dir), "--data", str(bad), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "bad.jsonl:2" in result.stderr and "codec 'nope'" in result.stderr
    result = runner.invoke(app, ["train", str(model_dir), "--data", str(data), "--stage", "3", "--device", "cpu"])
    assert result.exit_code == 2
