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
