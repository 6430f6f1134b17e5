"""The model directory's ``config.json``: everything needed to rebuild a TEAL model.

A model directory holds::

    config.json          # this schema (format "teal-model", version 1)
    adapter.safetensors  # teal's parameters only: E, O, projections, boundary rows, bias-norm, LoRA

The base LLM is named (and pinned by its weights' sha256), never copied. The joint
vocabulary is laid out as ``[text ids | boundary tokens | codec 0 ids | codec 1 ids | ...]``;
offsets live here and never in token records, so records outlive models.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TealError

FORMAT = "teal-model"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
ADAPTER_NAME = "adapter.safetensors"
BOUNDARY_TOKENS = {"image": ("<img>", "</img>"), "audio": ("<aud>", "</aud>")}


class ModelDirError(TealError):
    """A model directory is missing, damaged, or does not fit what it is used with."""


@dataclass
class CodecEntry:
    """One codec the model reads and/or writes.

    Attributes:
        key: the parameter prefix in the adapter (``codec0``...): codec names may hold ``/`` or ``.``.
        name: the codec name records carry (``segment.codec``).
        path: absolute path of a codec directory, so the model works from any folder; None for built-ins.
        modality: ``image`` or ``audio``.
        vocab_size: K, the codec's number of ids.
        code_dim: width of ``E`` and ``O`` (the codebook's width with ``init: codebook``).
        offset: first joint-vocabulary id of this codec.
        input: the model reads this codec (has ``E`` and the input projection).
        output: the model writes this codec (has ``O`` and the output projection).
        init: ``codebook`` or ``random``.
        segment: what generation needs to make a segment: ``{"shape": [H, W]}`` for images,
            ``{"frame_rate": r}`` for audio.
        weights: the codec's weights id when it has one (checked against token segments).
    """

    key: str
    name: str
    modality: str
    vocab_size: int
    code_dim: int
    offset: int
    input: bool = True
    output: bool = True
    init: str = "codebook"
    segment: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    weights: str | None = None

    @property
    def grid(self) -> list[int] | None:
        shape = self.segment.get("shape")
        return list(shape) if shape else None

    @property
    def tokens_per_item(self) -> int | None:
        """Ids in one segment when the codec has a fixed grid (H*W), else None."""
        grid = self.grid
        return math.prod(grid) if grid else None


@dataclass
class ModelConfig:
    """The shape-defining description of a TEAL model (see the module docstring)."""

    llm: dict[str, Any]
    text_vocab_size: int
    hidden_size: int
    codecs: list[CodecEntry]
    boundary: dict[str, list[str]]
    boundary_offset: int
    dtype: str = "float32"
    groups: dict[str, Any] = field(default_factory=lambda: {"bias_norm": None, "lora": None})
    trainable: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    format: str = FORMAT
    version: int = FORMAT_VERSION
    teal_version: str = ""
    # Set once by init_model and kept by training: which model a checkpoint belongs to
    # (a directory made again with "init-embeddings --force" gets a new one); "" in older directories.
    init_id: str = ""

    # ---------------------------------------------------------------- vocabulary layout

    @property
    def boundary_list(self) -> list[tuple[str, str]]:
        """(modality, token) pairs in id order."""
        return [(m, tok) for m, toks in self.boundary.items() for tok in toks]

    def boundary_id(self, modality: str, closing: bool = False) -> int:
        """The joint id of ``<img>`` (or ``</img>`` with ``closing``) for ``modality``."""
        if modality not in self.boundary:
            raise ModelDirError(f"this model has no {modality} codec (it reads {', '.join(self.boundary) or 'text only'})")
        index = [m for m, _ in self.boundary_list].index(modality) + int(closing)
        return self.boundary_offset + index

    @property
    def vocab_size(self) -> int:
        """Size of the joint vocabulary (text + boundary + every codec)."""
        last = self.codecs[-1] if self.codecs else None
        return last.offset + last.vocab_size if last else self.boundary_offset + len(self.boundary_list)

    def codec(self, name: str) -> CodecEntry:
        for entry in self.codecs:
            if entry.name == name or (entry.path and entry.path == name):
                return entry
        known = ", ".join(c.name for c in self.codecs) or "none"
        raise ModelDirError(f"codec '{name}' is not part of this model (it has: {known}); "
                            "tokenize with one of those or make a model with 'teal init-embeddings --codec'")

    def output_codecs(self, modality: str) -> list[CodecEntry]:
        return [c for c in self.codecs if c.modality == modality and c.output]

    # ---------------------------------------------------------------- files

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        order = ["format", "version", "teal_version", "init_id", "llm", "text_vocab_size", "hidden_size", "dtype",
                 "boundary", "boundary_offset", "codecs", "groups", "trainable", "history"]
        return {k: out[k] for k in order}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def save(self, directory: str | Path) -> None:
        (Path(directory) / CONFIG_NAME).write_text(self.dumps())

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / CONFIG_NAME
        if not Path(directory).is_dir():
            raise ModelDirError(f"{directory}: not a model directory (make one with 'teal init-embeddings -o {directory}')")
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelDirError(f"{path}: missing; {directory} is not a teal model directory "
                                "(make one with 'teal init-embeddings')") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelDirError(f"{path}: cannot read the model config ({exc})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ModelDirError(f"{path}: not a teal model config (expected \"format\": \"{FORMAT}\")")
        version = obj.get("version")
        if not isinstance(version, int) or version < 1:
            raise ModelDirError(f"{path}: bad format version {version!r}")
        if version > FORMAT_VERSION:
            raise ModelDirError(f"{path}: model format version {version} is newer than this teal reads ({FORMAT_VERSION}); upgrade teal")
        try:
            codecs = [CodecEntry(**c) for c in obj["codecs"]]
            return cls(
                llm=dict(obj["llm"]), text_vocab_size=int(obj["text_vocab_size"]), hidden_size=int(obj["hidden_size"]),
                codecs=codecs, boundary={k: list(v) for k, v in obj["boundary"].items()},
                boundary_offset=int(obj["boundary_offset"]), dtype=obj.get("dtype", "float32"),
                groups=dict(obj.get("groups") or {"bias_norm": None, "lora": None}),
                trainable=list(obj.get("trainable", [])), history=list(obj.get("history", [])),
                version=version, teal_version=obj.get("teal_version", ""), init_id=str(obj.get("init_id") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(f"{path}: malformed model config ({type(exc).__name__}: {exc})") from None
