"""Codec resolution: plugins through entry points, codec search path, clear unknown-name errors."""

import sys

import pytest

from teal_cli.codecs import registry
from teal_cli.errors import CodecError


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Install a fake package that registers a codec through the teal.codecs entry point group."""
    (tmp_path / "toyplug.py").write_text(
        "from teal_cli.codecs.registry import CodecSpec\n"
        "from teal_cli.codecs.base import ImageCodec\n"
        "class Toy(ImageCodec):\n    vocab_size = 3\n    name = 'toy'\n"
        "def build(spec, **kw):\n    return Toy()\n"
        "SPECS = [CodecSpec(name='toy', family='toy', loader=build, modality='image', description='a toy')]\n")
    dist = tmp_path / "toyplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[teal.codecs]\ntoy = toyplug:SPECS\nbroken = toyplug:MISSING\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PLUGINS", None)
    yield
    sys.modules.pop("toyplug", None)


def test_plugin_codec_resolves_and_broken_plugin_only_warns(plugin):
    with pytest.warns(UserWarning, match="skipping codec plugin 'broken'"):
        codec = registry.load_codec("toy")
    assert codec.vocab_size == 3
    assert "toy" in [s.name for s in registry.available_codecs()]


def test_codec_search_path(tmp_path, monkeypatch, patch_codec):
    import shutil

    elsewhere = tmp_path / "lib"
    shutil.move(str(patch_codec), elsewhere / "patch-p4-k64") if elsewhere.mkdir() is None else None
    with pytest.raises(CodecError, match="unknown codec 'patch-p4-k64'"):
        registry.load_codec("patch-p4-k64")
    monkeypatch.setenv("TEAL_CODEC_PATH", str(elsewhere))
    assert registry.load_codec("patch-p4-k64").name == "patch-p4-k64"
    # Loaded by a path that is not on the search path, records carry the path itself.
    monkeypatch.delenv("TEAL_CODEC_PATH")
    assert registry.load_codec(str(elsewhere / "patch-p4-k64")).name == str(elsewhere / "patch-p4-k64")
