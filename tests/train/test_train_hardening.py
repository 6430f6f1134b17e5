"""teal train / init-embeddings as users break them (issue 30): re-made models and resume,
damaged checkpoints, option ranges, bad output paths, divergence, data that changes, logs."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_teal import make_model_dir, toy_captions, toy_pairs  # noqa: E402

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A model directory and what made it (the tiny LLM and the two codec directories)."""
    root = tmp_path_factory.mktemp("hardening")
    return make_model_dir(root)


@pytest.fixture
def model_dir(store, tmp_path):
    return Path(shutil.copytree(store, tmp_path / "run"))


def options(data, **kw):
    from teal_cli.train import TrainOptions

    base = dict(data=str(data), stage=2, batch_size=4, max_steps=6, lr=1e-2, device="cpu", checkpoint_every=2)
    base.update(kw)
    return TrainOptions(**base)


def digest(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def run_cli(*args):
    from typer.testing import CliRunner

    from teal_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, code, *needles):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def stopped_run(directory, data, after=2, **kw):
    """An unfinished run of ``directory``: a checkpoint at step ``after``."""
    from teal_cli.train import Trainer

    with pytest.raises(KeyboardInterrupt):
        Trainer(directory, options(data, **kw), stop_after=after).run()
    return directory / "checkpoints" / (directory / "checkpoints" / "latest").read_text().strip()


# ---------------------------------------------------------------------- 4. a re-made model


def test_init_embeddings_force_replaces_the_whole_directory_and_resume_never_brings_the_old_model_back(model_dir, tmp_path,
                                                                                                       monkeypatch):
    from teal_cli.errors import UsageError
    from teal_cli.train import train

    data = toy_captions(tmp_path / "s.jsonl", 24)
    stopped_run(model_dir, data)
    old_checkpoints = Path(shutil.copytree(model_dir / "checkpoints", tmp_path / "old-checkpoints"))
    # Re-make the directory over the same LLM and codecs with another init: a new model.
    cfg = json.loads((model_dir / "config.json").read_text())
    monkeypatch.setenv("TEAL_CODEC_PATH", str(Path(cfg["codecs"][0]["path"]).parent))
    codec_args = [a for c in cfg["codecs"] for a in ("--codec", c["name"])]
    res = run_cli("init-embeddings", "--llm", cfg["llm"]["name"], *codec_args, "--image-size", 8, "--init", "random",
                  "--code-dim", 8, "--seed", 5, "-o", model_dir, "--force", "-q")
    assert res.exit_code == 0, res.output
    new_cfg = json.loads((model_dir / "config.json").read_text())
    assert new_cfg["init_id"] and new_cfg["init_id"] != cfg["init_id"]
    assert not (model_dir / "checkpoints").exists() and not (model_dir / "metrics.jsonl").exists()
    before = digest(model_dir)
    # The old run's checkpoint put back by hand is refused, with or without --resume.
    shutil.copytree(old_checkpoints, model_dir / "checkpoints")
    for resume in (True, False):
        with pytest.raises(UsageError, match="checkpoint of another model"):
            train(model_dir, options(data), resume=resume)
    shutil.rmtree(model_dir / "checkpoints")
    assert digest(model_dir) == before
    result = train(model_dir, options(data), resume=True)  # nothing of this model to resume: a fresh run
    assert result.steps == 6
    assert json.loads((model_dir / "config.json").read_text())["codecs"][0]["code_dim"] == 8


def test_force_replaces_only_model_directories_and_outputs_are_checked_before_any_work(model_dir, tmp_path):
    cfg = json.loads((model_dir / "config.json").read_text())
    common = ["init-embeddings", "--llm", "no-such-llm-anywhere", "--codec", cfg["codecs"][0]["path"], "--image-size", 8]
    plain = tmp_path / "plain.txt"
    plain.write_text("keep me")
    one_error_line(run_cli(*common, "-o", plain / "x"), 2, "is not a directory")
    one_error_line(run_cli(*common, "-o", plain, "--force"), 2, "exists and is not a directory")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.png").write_bytes(b"png")
    one_error_line(run_cli(*common, "-o", other, "--force"), 2, "not a teal model directory")
    assert (other / "a.png").read_bytes() == b"png" and plain.read_text() == "keep me"
    # The checks come before the (here impossible) LLM load: a good path gets to the LLM error.
    res = run_cli(*common, "-o", tmp_path / "new")
    assert res.exit_code != 0 and "no-such-llm-anywhere" in res.stderr and "is not a directory" not in res.stderr


# ---------------------------------------------------------------------- 5. one run per directory


def test_a_run_refuses_a_directory_whose_lock_is_held_and_takes_over_a_dead_ones(model_dir, tmp_path):
    from teal_cli.train import train
    from teal_cli.train.lock import LOCK_NAME, DirectoryBusy, TrainLock

    data = toy_captions(tmp_path / "s.jsonl", 24)
    with TrainLock(model_dir):
        before = digest(model_dir)
        with pytest.raises(DirectoryBusy, match=r"being trained by pid \d+ on host"):
            train(model_dir, options(data))
        assert digest(model_dir) == before
        # init-embeddings --force does not pull the directory from under a run either.
        cfg = json.loads((model_dir / "config.json").read_text())
        res = run_cli("init-embeddings", "--llm", "no-such-llm-anywhere", "--codec", cfg["codecs"][0]["path"],
                      "--image-size", 8, "-o", model_dir, "--force")
        one_error_line(res, 1, "being trained by pid")
        assert digest(model_dir) == before
    # A lock file left by a process that died (the kernel dropped its lock) is taken over.
    (model_dir / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "h", "started": "then"}) + "\n")
    assert train(model_dir, options(data, max_steps=2)).steps == 2
    assert not (model_dir / LOCK_NAME).exists()


def test_a_directory_train_cannot_write_or_that_is_no_directory_is_one_line_before_loading(model_dir, tmp_path):
    from teal_cli.train.lock import LOCK_NAME

    data = toy_pairs(tmp_path / "p.jsonl", 8)
    (model_dir / LOCK_NAME).mkdir()  # the lock file cannot be made (as in a read-only directory)
    one_error_line(run_cli("train", model_dir, "--data", data, "--device", "cpu"), 2, "must be writable")
    plain = tmp_path / "file"
    plain.write_text("x")
    one_error_line(run_cli("train", plain, "--data", data, "--device", "cpu"), 2, "not a directory")
    one_error_line(run_cli("train", tmp_path / "none", "--data", data, "--device", "cpu"), 2, "no such directory")


# ---------------------------------------------------------------------- 6. damaged checkpoints


def _damage(checkpoint: Path, case: str) -> str:
    """Damage one file of ``checkpoint``; returns the file name the error must name."""
    if case == "optimizer-garbage":
        (checkpoint / "optimizer.safetensors").write_bytes(b"\x00garbage" * 10)
        return "optimizer.safetensors"
    if case == "optimizer-truncated":
        path = checkpoint / "optimizer.safetensors"
        path.write_bytes(path.read_bytes()[:200])
        return "optimizer.safetensors"
    if case == "optimizer-foreign":
        from safetensors.torch import save_file

        save_file({"0.exp_avg": torch.zeros(3, 3), "0.exp_avg_sq": torch.zeros(3, 3), "0.step": torch.tensor(1.0)},
                  str(checkpoint / "optimizer.safetensors"))
        return "optimizer.safetensors"
    if case == "rng-garbage":
        (checkpoint / "rng.safetensors").write_bytes(b"")
        return "rng.safetensors"
    if case == "rng-keys":
        from safetensors.torch import save_file

        save_file({"other": torch.zeros(4, dtype=torch.uint8)}, str(checkpoint / "rng.safetensors"))
        return "rng.safetensors"
    if case == "state-keys":
        state = json.loads((checkpoint / "state.json").read_text())
        del state["scheduler"]
        (checkpoint / "state.json").write_text(json.dumps(state))
        return "state.json"
    if case == "state-rng":
        state = json.loads((checkpoint / "state.json").read_text())
        state["rng"] = {"numpy": [1, 2]}
        (checkpoint / "state.json").write_text(json.dumps(state))
        return "state.json"
    if case == "adapter":
        (checkpoint / "adapter.safetensors").write_bytes(b"\xff" * 64)
        return "adapter.safetensors"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["optimizer-garbage", "optimizer-truncated", "optimizer-foreign", "rng-garbage",
                                  "rng-keys", "state-keys", "state-rng", "adapter"])
def test_every_damaged_checkpoint_file_is_one_line_naming_it(model_dir, tmp_path, case):
    data = toy_captions(tmp_path / "s.jsonl", 24)
    checkpoint = stopped_run(model_dir, data)
    name = _damage(checkpoint, case)
    res = run_cli("train", model_dir, "--data", data, "--stage", 2, "--batch-size", 4, "--max-steps", 6, "--lr", "1e-2",
                  "--checkpoint-every", 2, "--device", "cpu", "--resume", "-q")
    one_error_line(res, 1, str(checkpoint / name))


def test_a_garbled_latest_pointer_falls_back_to_the_newest_checkpoint(model_dir, tmp_path):
    from teal_cli.train import train

    data = toy_captions(tmp_path / "s.jsonl", 24)
    stopped_run(model_dir, data)
    (model_dir / "checkpoints" / "latest").write_bytes(b"\xff\xfe../../etc\n")
    assert train(model_dir, options(data), resume=True).steps == 6


# ---------------------------------------------------------------------- 8. option ranges


@pytest.mark.parametrize("args, needle", [
    (["--lr", "nan"], "--lr nan"), (["--lr", "-1"], "--lr -1"), (["--lr", "0"], "--lr 0"), (["--lr", "inf"], "--lr inf"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--weight-decay", "nan"], "--weight-decay"),
    (["--epochs", "inf"], "--epochs inf"), (["--epochs", "nan"], "--epochs"), (["--epochs", "1e308"], "--epochs"),
    (["--epochs", "0"], "--epochs"), (["--clip", "-1"], "--clip -1"), (["--clip", "nan"], "--clip"),
    (["--val-fraction", "nan"], "--val-fraction"), (["--val-fraction", "-0.5"], "--val-fraction"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 64)], "--seed"),
])
def test_every_numeric_train_option_is_a_usage_error_before_the_model_loads(model_dir, tmp_path, args, needle):
    data = toy_pairs(tmp_path / "p.jsonl", 8)
    res = run_cli("train", model_dir, "--data", data, "--device", "cpu", *args)
    one_error_line(res, 2, needle)
    from teal_cli.errors import UsageError
    from teal_cli.train import Trainer, TrainOptions

    def never(*_):
        raise AssertionError("the model was loaded")

    field = args[0][2:].replace("-", "_")
    value = {"seed": int}.get(field, float)(args[1])
    with pytest.raises(UsageError):
        Trainer(model_dir, TrainOptions(data=str(data), device="cpu", **{field: value}), load=never).run()


@pytest.mark.parametrize("args, needle", [
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 64)], "--seed"),
    (["--code-dim", str(10 ** 9), "--init", "random"], "--code-dim"), (["--image-size", str(10 ** 9)], "--image-size"),
])
def test_init_embeddings_numeric_options_are_checked_before_anything_loads(model_dir, tmp_path, args, needle):
    cfg = json.loads((model_dir / "config.json").read_text())
    res = run_cli("init-embeddings", "--llm", "no-such-llm-anywhere", "--codec", cfg["codecs"][0]["path"], "--image-size", 8,
                  *args, "-o", tmp_path / "m")
    one_error_line(res, 2, needle)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_finite_state(model_dir, tmp_path):
    from safetensors.torch import load_file

    data = toy_captions(tmp_path / "s.jsonl", 24)
    before = {k: v for k, v in digest(model_dir).items()}
    res = run_cli("train", model_dir, "--data", data, "--stage", 2, "--batch-size", 4, "--max-steps", 30, "--lr", "1e8",
                  "--checkpoint-every", 1, "--device", "cpu", "-q")
    line = one_error_line(res, 1, "training diverged", "--lr")
    assert {k: v for k, v in digest(model_dir).items() if not k.startswith(("checkpoints", "metrics"))} == before
    for entry in [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]:
        assert math.isfinite(entry["loss"]), entry
    latest = model_dir / "checkpoints" / "latest"
    if latest.exists():  # the steps before it diverged: every saved tensor finite
        checkpoint = model_dir / "checkpoints" / latest.read_text().strip()
        assert f"step {int(checkpoint.name.split('-')[1])})" in line
        for name in ("adapter.safetensors", "optimizer.safetensors"):
            for key, tensor in load_file(str(checkpoint / name)).items():
                assert torch.isfinite(tensor).all(), (name, key)


def test_a_nan_adapter_saved_by_an_older_teal_is_refused_on_load(model_dir):
    from safetensors.torch import load_file, save_file

    from teal_cli.model import TealModel
    from teal_cli.model.config import ModelDirError

    tensors = load_file(str(model_dir / "adapter.safetensors"))
    tensors["boundary_in"][0, 0] = float("nan")
    save_file(tensors, str(model_dir / "adapter.safetensors"))
    with pytest.raises(ModelDirError, match="boundary_in holds NaN or infinite values"):
        TealModel.from_dir(model_dir)


# ---------------------------------------------------------------------- the data under a run


def test_resume_refuses_data_edited_since_the_checkpoint(model_dir, tmp_path):
    from teal_cli.errors import UsageError
    from teal_cli.train import train

    data = toy_captions(tmp_path / "s.jsonl", 24)
    stopped_run(model_dir, data)
    lines = data.read_text().splitlines()
    record = json.loads(lines[5])
    record["segments"][1]["text"] = "three" if record["segments"][1]["text"] != "three" else "two"
    lines[5] = json.dumps(record)
    data.write_text("\n".join(lines) + "\n")  # same records, same count: only the content differs
    with pytest.raises(UsageError, match="edited or replaced"):
        train(model_dir, options(data), resume=True)


def test_a_data_file_replaced_during_the_run_is_named_and_the_steps_done_are_saved(model_dir, tmp_path):
    from teal_cli.errors import DataError
    from teal_cli.train import train

    data = toy_captions(tmp_path / "s.jsonl", 24)
    original = data.read_bytes()

    def replace_at_step_3(info):
        if info["step"] == 3:
            toy_captions(tmp_path / "other.jsonl", 24, seed=9, task=None)
            shutil.copy(tmp_path / "other.jsonl", data)

    with pytest.raises(DataError, match="changed during training") as info:
        train(model_dir, options(data, checkpoint_every=0), on_step=replace_at_step_3)
    assert "invalid JSON" not in str(info.value) and "\n" not in str(info.value)
    assert (model_dir / "checkpoints" / "latest").read_text().startswith("step-00000003-")
    data.write_bytes(original)  # restored: the run continues where it stopped
    from teal_cli.train import train as again

    assert again(model_dir, options(data, checkpoint_every=0), resume=True).steps == 6


# ---------------------------------------------------------------------- logs


def test_progress_goes_to_a_log_as_plain_lines_and_q_silences_it(model_dir, tmp_path):
    data = toy_pairs(tmp_path / "p.jsonl", 16)
    args = ["train", model_dir, "--data", data, "--max-steps", 3, "--batch-size", 4, "--device", "cpu"]
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith("step ")]
    assert lines[0].startswith("step 1/3  loss ") and lines[-1].startswith("step 3/3  loss "), res.stderr
    assert all("tok/s" in x and "  lr " in x and "ETA " in x for x in lines)
    shutil.rmtree(model_dir / "checkpoints")
    res = run_cli(*args, "-q")
    assert res.exit_code == 0 and res.stderr == ""


def test_model_and_checkpoint_directories_follow_the_umask(model_dir, tmp_path):
    import os

    from teal_cli.model import TealModel
    from teal_cli.train import train

    old = os.umask(0o022)
    try:
        TealModel.from_dir(model_dir).save(tmp_path / "copy")
        assert (tmp_path / "copy").stat().st_mode & 0o777 == 0o755
        train(model_dir, options(toy_captions(tmp_path / "s.jsonl", 24), max_steps=2))
        checkpoint = model_dir / "checkpoints" / (model_dir / "checkpoints" / "latest").read_text().strip()
        assert checkpoint.stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)


def test_replacing_a_model_directory_through_a_symlink_replaces_its_target_and_keeps_the_link(model_dir, tmp_path):
    from teal_cli.model import TealModel

    model = TealModel.from_dir(model_dir)
    (model_dir / "checkpoints").mkdir()
    link = tmp_path / "link"
    link.symlink_to(model_dir)
    model.save(link, replace=True)
    assert link.is_symlink() and link.resolve() == model_dir.resolve()
    assert not (model_dir / "checkpoints").exists() and (model_dir / "adapter.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
