"""Reading weight and config files: one place that turns a damaged file into one line.

Every loader in teal (codecs, feature extractors, vocoders, codec directories) reads its
files through these functions, so that a file that is missing, truncated, corrupt, of
another format, or inconsistent with its config raises
:class:`~teal_cli.errors.CodecError` naming the file and what is wrong, never a traceback:

- :func:`read_json` / :func:`read_yaml`: a config file that must hold a mapping;
- :func:`safetensors_header` / :func:`read_safetensors`: a ``.safetensors`` file, its header
  checked against the file's size before any tensor is read (a truncated download says so);
- :func:`hf_weight_files`: a Hugging Face folder's weight files (``model.safetensors``,
  sharded ``model.safetensors.index.json`` + shards, ``pytorch_model.bin`` and its index),
  every listed shard present;
- :func:`read_torch`: a torch ``.pt``/``.pth``/``.ckpt``/``.pkl``/``.bin`` (zip or legacy),
  through :mod:`teal_cli.weights.safe_pickle` (nothing in the file is run), tensors read;
- :func:`check_shapes`: state-dict shapes against what the architecture expects, before
  ``load_state_dict`` (whose size-mismatch error is a multi-line traceback);

The safetensors layout checked is the published one (huggingface/safetensors README):
an unsigned little-endian 64-bit header size N, N bytes of JSON (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the data, offsets
relative to its start. Header validation is written here (a few lines) because the
library's own errors (``MetadataIncompleteBuffer``, ``HeaderTooLarge``) do not say
whether a file is truncated or not a safetensors file at all; the data is then read with
the ``safetensors`` library itself.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..errors import CodecError, first_line

if TYPE_CHECKING:
    import torch

# bytes per element of each safetensors dtype name
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100_000_000  # the library's own limit


def _missing(path: Path, what: str) -> CodecError:
    if path.is_dir():
        return CodecError(f"{path}: is a folder, expected a {what} file")
    return CodecError(f"{path}: {what} not found")


# ---------------------------------------------------------------- configs


def read_json(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A JSON file that holds one object. Raises CodecError for a missing, non-UTF-8,
    invalid or non-object file, naming it (and the line and column of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, what)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CodecError(f"{path}: {what} is not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise CodecError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CodecError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                         "truncated or edited by hand?") from None
    if not isinstance(data, dict):
        raise CodecError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file that holds one mapping (``yaml.safe_load``: no tags that run code)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise _missing(path, what)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise CodecError(f"{path}: {what} is not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise CodecError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise CodecError(f"{path}: {what} is not valid YAML ({problem}{at})") from None
    if not isinstance(data, dict):
        raise CodecError(f"{path}: {what} must be a YAML mapping, got {type(data).__name__}")
    return data


def config_value(config: Mapping[str, Any], key: str, kind: type | tuple, where: str | Path, *,
                 positive: bool = False) -> Any:
    """``config[key]``, checked to be of ``kind`` (ints: not bools; ``positive``: > 0)."""
    if key not in config:
        raise CodecError(f"{where}: '{key}' is missing")
    value = config[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise CodecError(f"{where}: '{key}' must be {names}, got {json.dumps(value, default=str)[:60]}")
    if positive and not value > 0:
        raise CodecError(f"{where}: '{key}' must be positive, got {value}")
    return value


# ---------------------------------------------------------------- safetensors


def safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors file, its layout checked against the
    file's size: a short file is reported as truncated, anything else as not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "safetensors weights file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CodecError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise CodecError(f"{path}: not a safetensors file (its first 8 bytes give a {n}-byte header)")
            if 8 + n > size:
                raise CodecError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as exc:
        raise CodecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CodecError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CodecError(f"{path}: not a safetensors file (its header is not a JSON object)")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            itemsize = _ST_ITEMSIZE[dtype]
            if not all(isinstance(s, int) and s >= 0 for s in shape) or not 0 <= begin <= stop:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CodecError(f"{path}: not a valid safetensors file (bad header entry for '{name}')") from None
        if stop - begin != math.prod(shape) * itemsize:
            raise CodecError(f"{path}: corrupt safetensors header: '{name}' {list(shape)} {dtype} "
                             f"does not fill its {stop - begin} bytes")
        out[name] = (dtype, shape)
        end = max(end, stop)
    if 8 + n + end > size:
        raise CodecError(f"{path}: truncated safetensors file: its tensors need {8 + n + end} bytes, the file has "
                         f"{size} (an interrupted download? fetch it again)")
    return out


def read_safetensors(path: str | Path, keep: Callable[[str], bool] | None = None) -> dict[str, "torch.Tensor"]:
    """The tensors of a safetensors file (those whose name ``keep`` accepts), on the CPU.
    Raises CodecError naming the file when it is missing, truncated or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    names = safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in names if keep is None or keep(k)}
    except Exception as exc:  # noqa: BLE001 - the library's own error types: one line naming the file
        raise CodecError(f"{path}: cannot read safetensors weights ({first_line(exc)})") from None


# ---------------------------------------------------------------- Hugging Face folders


# (index, single file) per format, safetensors first as transformers prefers them
HF_WEIGHT_NAMES = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def hf_weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a Hugging Face model folder, in load order: safetensors before
    torch pickles, and for each the shards its index (``model.safetensors.index.json`` /
    ``pytorch_model.bin.index.json``) lists, else the single file. A shard the index lists
    but the folder lacks is an error naming both."""
    folder = Path(folder)
    for index_name, single in HF_WEIGHT_NAMES:
        index = folder / index_name
        if index.exists():
            data = read_json(index, "weights index")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
                raise CodecError(f"{index}: 'weight_map' must map tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CodecError(f"{folder / missing[0]}: shard missing ({len(missing)} of the {len(shards)} that "
                                 f"{index.name} lists are absent); download the whole model again")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    for stem in ("model", "pytorch_model"):
        shards = sorted(folder.glob(f"{stem}-*-of-*.*"))
        if shards:
            index = "model.safetensors.index.json" if shards[0].suffix == ".safetensors" else "pytorch_model.bin.index.json"
            raise CodecError(f"{folder / index}: not found, though {len(shards)} shard(s) ({shards[0].name}...) are "
                             "there; the index says which tensors each holds: download it too")
    raise CodecError(f"{folder}: no weights (model.safetensors, a sharded index or pytorch_model.bin not found)")


def read_weight_files(files: Iterable[Path], keep: Callable[[str], bool] | None = None) -> dict[str, "torch.Tensor"]:
    """Every tensor of ``files`` (safetensors or torch pickles) into one CPU state dict."""
    state: dict[str, Any] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(read_safetensors(file, keep))
        else:
            root = read_torch(file)
            if not isinstance(root, dict):
                raise CodecError(f"{file}: expected a state dict of tensors, got {type(root).__name__}")
            state.update(load_refs(tensor_refs(root), str(file), keep))
    return state


# ---------------------------------------------------------------- torch pickles


def read_torch(path: str | Path, what: str | None = None) -> Any:
    """A torch checkpoint unpickled without running it (:func:`teal_cli.weights.safe_pickle.load`);
    tensors come back as lazy ``TensorRef``s, read with :func:`load_refs`."""
    from . import safe_pickle

    path = Path(path)
    if not path.is_file():
        raise _missing(path, "checkpoint")
    return safe_pickle.load(path, what=what)


def tensor_refs(obj: Any) -> dict[str, Any]:
    """``{dotted name: TensorRef}`` of a nested dict (a state dict)."""
    from . import safe_pickle

    return dict(safe_pickle.iter_tensors(obj))


def load_refs(refs: Mapping[str, Any], where: str, keep: Callable[[str], bool] | None = None) -> dict[str, "torch.Tensor"]:
    """Read ``TensorRef``s into tensors; a truncated or corrupt storage names ``where``."""
    return {name: ref.load(where) for name, ref in refs.items() if keep is None or keep(name)}


# ---------------------------------------------------------------- shapes


def _fmt(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


def check_shapes(expected: Mapping[str, Any], actual: Mapping[str, Any], file: str | Path, *,
                 missing_ok: bool = False, unexpected_ok: bool = False, hint: str = "") -> None:
    """Refuse a state dict that does not fit an architecture, in one line naming ``file``.

    ``expected``/``actual`` map names to shapes (tuples, ``torch.Size``) or to anything with
    a ``.shape`` (tensors, ``TensorRef``s). Shape mismatches are always refused; missing and
    unexpected names unless ``missing_ok``/``unexpected_ok``. ``hint`` ends the message
    (e.g. "the config disagrees with the weights").
    """

    def shape(v: Any) -> tuple:
        return tuple(int(s) for s in (v.shape if hasattr(v, "shape") else v))

    parts = []
    wrong = [(k, shape(actual[k]), shape(v)) for k, v in expected.items() if k in actual and shape(actual[k]) != shape(v)]
    if wrong:
        k, got, want = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        parts.append(f"{k} has shape {list(got)} where the architecture expects {list(want)}{more}")
    missing = sorted(set(expected) - set(actual))
    if missing and not missing_ok:
        parts.append(f"missing {len(missing)} key(s): {_fmt(missing)}")
    unexpected = sorted(set(actual) - set(expected))
    if unexpected and not unexpected_ok:
        parts.append(f"unexpected {len(unexpected)} key(s): {_fmt(unexpected)}")
    if parts:
        raise CodecError(f"{file}: weights do not fit the model: {'; '.join(parts)}" + (f"; {hint}" if hint else ""))


def load_into(model: "torch.nn.Module", refs: Mapping[str, Any], where: str | Path, *,
              ignore: tuple[str, ...] = (), hint: str = "") -> "torch.nn.Module":
    """Fill a model built on the ``meta`` device with checkpoint tensors (``TensorRef``s or
    tensors): shapes are checked before any memory is allocated (a config that asks for a
    huge model fails in one line, not with a MemoryError), then the model is materialised
    on the CPU and loaded strictly. Returns it in eval mode, gradients off."""
    from .safe_pickle import load_strict

    given = {k: v for k, v in refs.items() if not k.startswith(ignore)}
    check_shapes(model.state_dict(), given, where, hint=hint)
    model = model.to_empty(device="cpu")
    load_strict(model, dict(refs), str(where), ignore=ignore, hint=hint)
    return model.eval().requires_grad_(False)


__all__ = ["check_shapes", "config_value", "load_into", "hf_weight_files", "load_refs", "read_json",
           "read_safetensors", "read_torch", "read_weight_files", "read_yaml", "safetensors_header", "tensor_refs",
           ]
