"""Codec names to codecs: built-in entries, ``teal.codecs`` plugins, local codec directories.

Resolution order for a name:
1. a built-in :class:`CodecSpec` (``dalle``, ``vqgan-f16-16384``, ...);
2. a spec registered by another package through the ``teal.codecs`` entry-point group
   (each entry point loads a ``CodecSpec``, a list of them, or a function returning either;
   loaded lazily, once per process);
3. a path to a codec directory (``config.json`` + weights);
4. a directory of that name in one of the ``TEAL_CODEC_PATH`` folders (``os.pathsep``
   separated; default ``./codecs`` then ``$TEAL_CACHE_DIR/codecs``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import CodecError
from ..weights.hub import cache_dir

if TYPE_CHECKING:
    from .base import Codec

ENTRY_POINT_GROUP = "teal.codecs"


@dataclass(frozen=True)
class CodecSpec:
    """A named codec: how to build it, lazily.

    Attributes:
        name: what users type and records carry.
        family: the implementation family (``vqgan``, ``dalle``, ``beit2``, ``kmeans``...).
        loader: ``"module:function"``; called as ``function(spec, **options)`` and returns a
            :class:`~teal_cli.codecs.base.Codec`. A callable is accepted too (plugins).
        description: one line for ``teal codecs``.
        modality: ``image`` or ``audio``.
        options: fixed keyword arguments for the loader (hub files, variant).
    """

    name: str
    family: str
    loader: str | Callable[..., "Codec"]
    modality: str
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def build(self, **kwargs: Any) -> "Codec":
        fn = self.loader
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn(self, **{**self.options, **kwargs})


_BUILTIN: dict[str, CodecSpec] = {}
_PLUGINS: dict[str, CodecSpec] | None = None


def register(spec: CodecSpec) -> CodecSpec:
    """Add a built-in spec (used by teal's own codec modules)."""
    _BUILTIN[spec.name] = spec
    return spec


def _builtin() -> dict[str, CodecSpec]:
    # The built-in table lives in one small module so that listing names imports no torch.
    from . import builtin  # noqa: F401  (registers on import)

    return _BUILTIN


def _plugins() -> dict[str, CodecSpec]:
    global _PLUGINS
    if _PLUGINS is None:
        from importlib.metadata import entry_points

        found: dict[str, CodecSpec] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, CodecSpec):
                    obj = obj()
                specs = obj if isinstance(obj, (list, tuple)) else [obj]
                for spec in specs:
                    if not isinstance(spec, CodecSpec):
                        raise TypeError(f"expected CodecSpec, got {type(spec).__name__}")
                    found[spec.name] = spec
            except Exception as exc:  # a broken plugin must not break teal
                import warnings

                warnings.warn(f"teal: skipping codec plugin '{ep.name}' ({ep.value}): {exc}", stacklevel=2)
        _PLUGINS = found
    return _PLUGINS


def codec_search_path() -> list[Path]:
    """Folders searched for codec directories by name, in order."""
    env = os.environ.get("TEAL_CODEC_PATH")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [Path("codecs"), cache_dir() / "codecs"]


def is_codec_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def find_spec(name: str) -> CodecSpec | None:
    """The built-in or plugin spec called ``name``, if any."""
    return _builtin().get(name) or _plugins().get(name)


def resolve_dir(name: str) -> Path | None:
    """The codec directory ``name`` denotes (a path, or a name on the search path)."""
    path = Path(name).expanduser()
    if is_codec_dir(path):
        return path
    if os.sep in name or (os.altsep and os.altsep in name):
        return None
    for folder in codec_search_path():
        if is_codec_dir(folder / name):
            return folder / name
    return None


def record_name(name: str, directory: Path) -> str:
    """The name records carry for a codec directory: its bare name when that resolves to the
    same directory through the search path (so records stay portable), else the path given."""
    bare = directory.resolve().name
    found = None if find_spec(bare) else resolve_dir(bare)
    if found is not None and found.resolve() == directory.resolve():
        return bare
    return name


def available_codecs() -> list[CodecSpec]:
    """All named codecs, built-in then plugins."""
    return [*_builtin().values(), *(s for n, s in _plugins().items() if n not in _BUILTIN)]


def load_codec(name: str, *, device: Any = "cpu", **kwargs: Any) -> "Codec":
    """Build the codec ``name`` (see module docstring for resolution) on ``device``.

    Extra keyword arguments (``checkpoint``, ``config``...) go to the codec's loader.
    """
    spec = find_spec(name)
    if spec is not None:
        codec = spec.build(**kwargs)
        return codec.to(device)
    directory = resolve_dir(name)
    if directory is not None:
        from .kmeans_codec import load_codec_dir

        return load_codec_dir(directory, name=record_name(name, directory), **kwargs).to(device)
    if Path(name).expanduser().is_dir():
        raise CodecError(f"{Path(name) / 'config.json'}: not found, so {name} is not a codec directory "
                         "(a codec directory made by 'teal cluster' holds config.json and centroids.safetensors)")
    names = ", ".join(s.name for s in available_codecs())
    folders = ", ".join(str(p) for p in codec_search_path())
    raise CodecError(
        f"unknown codec '{name}': not a built-in ({names}) nor a codec directory here or in {folders} "
        "(fit one with 'teal cluster', or set TEAL_CODEC_PATH)"
    )


class CodecCache:
    """Load each codec once per process (records name codecs by string, many times)."""

    def __init__(self, device: Any = "cpu", **kwargs: Any):
        self.device = device
        self.kwargs = kwargs
        self._codecs: dict[str, "Codec"] = {}

    def get(self, name: str) -> "Codec":
        if name not in self._codecs:
            self._codecs[name] = load_codec(name, device=self.device, **self.kwargs)
        return self._codecs[name]
