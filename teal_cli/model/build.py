"""From names to a new model: resolve the base LLM and the codecs, then :func:`init_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .teal_model import TealModel, init_model, segment_spec


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

    dev = resolve_device(device)
    loaded = [load_codec(name, device="cpu") for name in codecs]
    roles = list(roles or [("both" if c.has_decoder else "input") for c in loaded])
    for codec, role in zip(loaded, roles):  # fail fast, before the (slow) LLM load
        segment_spec(codec, image_size, role in ("both", "output"))
    info(f"loading base LLM {llm}")
    base = load_base_llm(llm, revision=revision, device=dev)
    return init_model(base, loaded, roles=roles, init=init, code_dim=code_dim, image_size=image_size, seed=seed,
                      codec_paths=[codec_path(n) for n in codecs])
