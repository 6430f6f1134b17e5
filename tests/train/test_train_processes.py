"""teal train across processes: kill -9 and --resume, and two-process DDP (gloo) under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_teal import make_model_dir, toy_captions, toy_pairs  # noqa: E402

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("procs"))


def env():
    out = dict(os.environ, OMP_NUM_THREADS="1", TEAL_OFFLINE="1")
    out["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def losses(directory):
    lines = [json.loads(x) for x in (Path(directory) / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def test_kill_9_then_resume_continues_the_same_loss_curve(store, tmp_path):
    from teal_cli.train import TrainOptions, train

    data = toy_captions(tmp_path / "s.jsonl", 32)
    steps = 60
    args = ["--data", str(data), "--stage", "2", "--max-steps", str(steps), "--checkpoint-every", "3", "--batch-size", "4",
            "--lr", "1e-2", "--device", "cpu", "-q"]
    killed = Path(shutil.copytree(store, tmp_path / "killed"))
    whole = Path(shutil.copytree(store, tmp_path / "whole"))
    proc = subprocess.Popen([sys.executable, "-m", "teal_cli", "train", str(killed), *args], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    at = int(pointer.read_text().split("-")[1])
    assert 3 <= at < steps
    assert json.loads((killed / "config.json").read_text())["history"] == []

    torch.set_num_threads(1)
    reference = train(whole, TrainOptions(stage=2, data=str(data), max_steps=steps, checkpoint_every=3, batch_size=4,
                                          lr=1e-2, device="cpu"))
    done = subprocess.run([sys.executable, "-m", "teal_cli", "train", str(killed), *args, "--resume"], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == reference.losses  # bit-identical on the CPU
    assert json.loads((killed / "config.json").read_text())["history"][-1]["steps"] == steps


def test_two_process_ddp_under_torchrun_matches_one_process(store, tmp_path):
    data = toy_pairs(tmp_path / "p.jsonl", 32)
    args = ["--data", str(data), "--stage", "1", "--max-steps", "4", "--batch-size", "8", "--lr", "1e-2",
            "--device", "cpu", "--checkpoint-every", "2", "-q"]
    one = Path(shutil.copytree(store, tmp_path / "one"))
    two = Path(shutil.copytree(store, tmp_path / "two"))
    single = subprocess.run([sys.executable, "-m", "teal_cli", "train", str(one), *args], env=env(),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "teal_cli", "train", str(two), *args], env=env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [b[s] for s in a] == pytest.approx([a[s] for s in a], rel=1e-5)
    # Only rank 0 wrote: one metrics line per step (+ the final validation line), one checkpoint.
    assert len((two / "metrics.jsonl").read_text().splitlines()) == len((one / "metrics.jsonl").read_text().splitlines())
    assert len([p for p in (two / "checkpoints").iterdir() if p.is_dir()]) == 1
    from safetensors.torch import load_file

    wa, wb = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_a_second_run_on_a_directory_refuses_naming_the_first_and_a_killed_runs_lock_is_taken_over(store, tmp_path):
    data = toy_captions(tmp_path / "s.jsonl", 32)
    run = Path(shutil.copytree(store, tmp_path / "run"))
    args = ["--data", str(data), "--stage", "2", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu", "-q"]
    # No checkpoint: nothing but the lock tells the second run that the first is training.
    first = subprocess.Popen([sys.executable, "-m", "teal_cli", "train", str(run), *args, "--max-steps", "100000",
                              "--checkpoint-every", "0"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not metrics.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1].decode()
        second = subprocess.run([sys.executable, "-m", "teal_cli", "train", str(run), *args, "--max-steps", "4"],
                                env=env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        assert second.stderr.startswith("Error: ") and second.stderr.count("\n") == 1, second.stderr
        assert f"is being trained by pid {first.pid} on host " in second.stderr
        assert first.poll() is None  # the first run goes on, alone
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved lines
    # The killed run's lock file is left behind naming a dead process: the next run takes it over.
    assert str(first.pid) in (run / ".train.lock").read_text()
    assert not (run / "checkpoints").exists()
    third = subprocess.run([sys.executable, "-m", "teal_cli", "train", str(run), *args, "--max-steps", "2"],
                           env=env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert not (run / ".train.lock").exists()
