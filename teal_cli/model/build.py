"""From names to a new model: resolve the base LLM and the codecs, then :func:`init_model`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UsageError
from .config import ADAPTER_NAME, ModelConfig, ModelDirError
from .teal_model import TealModel, check_init_options, init_model, segment_spec


def check_model_output(path: str | Path, *, force: bool = False) -> None:
    """UsageError (one line) unless a model directory can be written at ``path``; checked
    before any work, so nothing is loaded or built for an output that would fail.

    ``path`` must not exist, or (with ``force``) be a teal model directory, or an empty
    folder: ``--force`` replaces the whole directory, and must never wipe other files. Its
    nearest existing ancestor must be a writable directory."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"-o {path}: exists and is not a directory")
        if not force:
            raise UsageError(f"-o {path}: already exists; pass --force to replace it "
                             "(the whole directory: its checkpoints and metrics go with it)")
        if any(target.iterdir()) and not _is_model_dir(target):
            raise UsageError(f"-o {path}: not a teal model directory, so --force will not replace it; "
                             "choose another path or remove it yourself")
        return
    for ancestor in target.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UsageError(f"-o {path}: {ancestor} is not a directory")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise UsageError(f"-o {path}: {ancestor} is not writable")
            return
        if ancestor.is_symlink():  # a dangling link: mkdir would fail after the work
            raise UsageError(f"-o {path}: {ancestor} is a broken symbolic link")


def _is_model_dir(directory: Path) -> bool:
    try:
        ModelConfig.load(directory)
        return True
    except ModelDirError:
        return (directory / ADAPTER_NAME).is_file()  # a damaged model directory is still one


def codec_path(name: str) -> str | None:
    """The absolute path of the codec directory ``name`` denotes, or None for a named codec."""
    from ..codecs.registry import find_spec, resolve_dir

    if find_spec(name) is not None:
        return None
    directory = resolve_dir(name)
    return str(Path(directory).resolve()) if directory is not None else None


def build_model(llm: str, codecs: Sequence[str], *, roles: Sequence[str] | None = None, revision: str | None = None,
                init: str = "codebook", code_dim: int | None = None, image_size: int | None = None, seed: int = 0,
                device: str = "cpu", info: Callable[[str], None] = lambda _: None) -> TealModel:
    """Load the base LLM ``llm`` and the codecs named in ``codecs`` and build a fresh model.

    Codecs load on the CPU (only their codebooks are needed). Errors are TealErrors: an
    unknown codec lists what exists, an unknown LLM says what to fetch."""
    from ..codecs.registry import load_codec
    from ..runtime.device import resolve_device
    from .llm import load_base_llm

    check_init_options(init, code_dim, image_size, seed)
    dev = resolve_device(device)
    loaded = [load_codec(name, device="cpu") for name in codecs]
    roles = list(roles or [("both" if c.has_decoder else "input") for c in loaded])
    for codec, role in zip(loaded, roles):  # fail fast, before the (slow) LLM load
        segment_spec(codec, image_size, role in ("both", "output"))
    info(f"loading base LLM {llm}")
    base = load_base_llm(llm, revision=revision, device=dev)
    return init_model(base, loaded, roles=roles, init=init, code_dim=code_dim, image_size=image_size, seed=seed,
                      codec_paths=[codec_path(n) for n in codecs])
