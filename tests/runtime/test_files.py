"""Atomic writes (teal_cli.runtime.files): all or nothing, with the modes the umask gives."""

from __future__ import annotations

import os
import stat

import pytest

from teal_cli.runtime.files import atomic_output, temp_dir_beside, umask, write_atomic


@pytest.fixture
def mask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(value: int) -> None:
        os.umask(value)

    yield set_mask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "o.txt"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as f:
        f.write("done")
    assert target.read_text() == "done"


def test_umask_is_read_without_changing_it(mask):
    mask(0o027)
    assert umask() == 0o027
    assert umask() == 0o027


@pytest.mark.parametrize("value", [0o022, 0o002, 0o077])
def test_files_get_the_mode_open_would_give(tmp_path, mask, value):
    """mkstemp makes 0600 files and the rename kept that mode whatever the umask (issue 30)."""
    mask(value)
    write_atomic(tmp_path / "a.bin", b"x")
    with atomic_output(tmp_path / "b.txt") as f:
        f.write("y")
    with open(tmp_path / "plain", "w") as f:
        f.write("z")
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.txt") == _mode(tmp_path / "plain") == 0o666 & ~value


@pytest.mark.parametrize("value", [0o022, 0o002])
def test_folders_get_the_mode_mkdir_would_give(tmp_path, mask, value):
    mask(value)
    tmp = temp_dir_beside(tmp_path / "model")
    os.replace(tmp, tmp_path / "model")
    (tmp_path / "plain").mkdir()
    assert _mode(tmp_path / "model") == _mode(tmp_path / "plain") == 0o777 & ~value


def test_codec_folders_follow_the_umask(tmp_path, mask):
    """A k-means codec directory: the folder and its files (safetensors writes 0600 itself)."""
    import torch

    from teal_cli.codecs.kmeans_codec import save_codec_dir
    from teal_cli.features.patch import PatchFeatures

    mask(0o002)
    extractor = PatchFeatures(patch_size=4, image_size=8)
    out = save_codec_dir(tmp_path / "codec", extractor, torch.zeros(3, 48), {})
    assert _mode(out) == 0o775
    assert {_mode(f) for f in out.iterdir()} == {0o664}
