"""teal_cli.media.inputs: what positional inputs expand to (folders, files, manifests) and the ids
records get, which feature caches and downstream joins key on."""

from __future__ import annotations

import json
import os

import pytest

from teal_cli.errors import DataError
from teal_cli.media.inputs import iter_input_records


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """data/{b.png, a.wav, notes.txt, .hidden.png, sub/c.JPG, .cache/d.png, z/}."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "z").mkdir()
    for name in ("b.png", "a.wav", "notes.txt", ".hidden.png", "sub/c.JPG", ".cache/d.png"):
        (root / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    return root


def _listing(inputs):
    return [(r.id, r.segments[0].modality, r.segments[0].path) for r in iter_input_records(inputs)]


def test_a_folder_is_its_media_files_sorted_recursively(tree):
    assert _listing(["data"]) == [("data/a.wav", "audio", "data/a.wav"), ("data/b.png", "image", "data/b.png"),
                                  ("data/sub/c.JPG", "image", "data/sub/c.JPG")]


@pytest.mark.parametrize("spelling", ["./data", "data/", "./data//", "data/./"])
def test_folder_ids_do_not_depend_on_how_the_folder_is_spelled(tree, spelling):
    assert [rid for rid, _, _ in _listing([spelling])] == ["data/a.wav", "data/b.png", "data/sub/c.JPG"]


def test_an_absolute_folder_gives_absolute_ids(tree):
    assert [rid for rid, _, _ in _listing([str(tree)])] == [os.path.join(tree, n) for n in ("a.wav", "b.png", "sub/c.JPG")]


def test_a_named_file_keeps_its_spelling_as_id(tree):
    assert _listing(["./data/b.png", "data/sub/c.JPG"]) == [("./data/b.png", "image", "./data/b.png"),
                                                             ("data/sub/c.JPG", "image", "data/sub/c.JPG")]


def test_manifest_paths_resolve_against_the_manifest_folder(tree):
    (tree / "m.jsonl").write_text(json.dumps({"id": "one", "image": "b.png", "text": "hi"}) + "\n")
    (record,) = list(iter_input_records(["data/m.jsonl"]))
    assert record.id == "one" and record.segments[0].path == os.path.join("data", "b.png")


@pytest.mark.parametrize("item, message", [("data/notes.txt", "not a media file"), ("data/missing.png", "no such file"),
                                           ("data/z", "folder holds no image or audio files"), ("", "no such file")])
def test_bad_inputs_name_the_input(tree, item, message):
    with pytest.raises(DataError, match=message) as err:
        list(iter_input_records([item]))
    assert str(err.value).startswith(f"{item}:")
