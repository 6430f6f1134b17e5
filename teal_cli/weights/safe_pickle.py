"""Read tensors out of torch checkpoints without running anything the file asks for.

Official image-tokenizer weights come as pickles: DALL-E's ``encoder.pkl`` / ``decoder.pkl``
are whole pickled ``nn.Module`` objects, taming's ``last.ckpt`` are Lightning checkpoints,
BEiT-v2's ``.pth`` are dicts. A pickle is a program; loading one with ``torch.load`` (or
``weights_only=False``) lets the file import and call anything.

Why not ``torch.load(weights_only=True)``? It is safe, but it refuses the pickled modules
of DALL-E outright, and real Lightning checkpoints too: their ``callbacks`` dict is keyed
by callback *classes* and their hyper-parameters may be omegaconf objects, which its
allowlist does not know. So teal uses one restricted unpickler for all three formats:

- every global the pickle names resolves to one of three things, never to the named
  object itself: (1) a tensor-rebuilding function written here (a few, pure data),
  (2) an inert :class:`Placeholder` class for *data* classes from namespaces a checkpoint
  legitimately names (``torch.nn.modules.*``, ``dall_e.*``, Lightning, omegaconf...),
  which only records the arguments and state it is given, or (3) a refusal,
  :class:`~teal_cli.errors.CodecError`, for anything else (``os.system``, ``eval``,
  ``subprocess``...). Nothing is ever imported on the pickle's behalf and no callable the
  pickle names is ever called. The list is an :class:`AllowList` (:data:`TORCH_CHECKPOINTS`),
  the mechanism the fairseq ``km.bin`` reader (:mod:`teal_cli.cluster.kmbin`) uses too;
- tensors come back as :class:`TensorRef` and are read from the file only when asked,
  so a 1 GB Lightning file whose optimizer state and discriminator are not needed costs
  only the tensors used.

Both torch serialisation formats are read: the zip format (torch >= 1.6, ``data.pkl`` +
``data/<key>``) and the legacy stream (magic number, pickled header, pickle, raw storages)
that pre-1.6 torch wrote.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..errors import CodecError, first_line

if TYPE_CHECKING:
    import torch

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Namespaces whose classes a checkpoint may legitimately name. They become Placeholders:
# never imported, never run.
_DATA_NAMESPACES = (
    "torch.nn.modules.",
    "dall_e.",
    "taming.",
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
    "modeling_vqkd",
    "modeling_finetune",
    "norm_ema_quantizer",
)
_DATA_GLOBALS = {
    ("argparse", "Namespace"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("typing", "Any"),
    ("typing", "Dict"),
    ("typing", "List"),
    ("typing", "Tuple"),
    ("typing", "Optional"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
}
# Plain builtin containers and numbers: constructing them runs no foreign code.
_BUILTINS: dict[str, Any] = {
    name: getattr(__import__("builtins"), name)
    for name in ("set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str", "bytes", "bytearray", "slice", "range", "object")
}

_TORCH_DTYPE_NAMES = (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32", "int",
    "int16", "short", "int8", "uint8", "bool", "complex64", "complex128",
)


class Placeholder:
    """Stands in for a class the pickle named; records what it was given, runs nothing.

    ``module``/``qualname`` say what it stands for; ``args`` the constructor arguments;
    ``state`` what ``BUILD`` set (for a pickled ``nn.Module``, its ``__dict__``).
    """

    module: str = ""
    qualname: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        obj.items = {}
        obj.elements = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args)
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slotstate)
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder {self.module}.{self.qualname}>"

    @property
    def attributes(self) -> dict:
        """The recorded ``__dict__`` (empty if the pickle set none)."""
        return self.state if isinstance(self.state, dict) else {}


_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def _placeholder(module: str, qualname: str) -> type:
    key = (module, qualname)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(qualname.rsplit(".", 1)[-1], (Placeholder,), {"module": module, "qualname": qualname})
    return _PLACEHOLDERS[key]


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: just a dtype."""

    dtype: Any  # torch.dtype


@dataclass
class _Storage:
    """A storage in the file, loaded on first use (``read`` returns its bytes)."""

    dtype: Any
    read: Callable[[], bytes]
    element_offset: int = 0  # legacy view storages start inside their root
    _flat: Any = field(default=None, repr=False)

    def flat(self, where: str = "checkpoint") -> Any:
        import torch

        if self._flat is None:
            try:
                data = bytearray(self.read())
            except CodecError:
                raise
            except Exception as exc:  # noqa: BLE001 - zip CRC/zlib/short reads: the file is damaged
                raise CodecError(f"{where}: tensor data cannot be read ({type(exc).__name__}: {exc}); "
                                 "the checkpoint is truncated or corrupt") from None
            if len(data) % self.dtype.itemsize:
                raise CodecError(f"{where}: a tensor storage of {len(data)} bytes does not hold whole {self.dtype} "
                                 "elements: the checkpoint is truncated or corrupt")
            self._flat = torch.frombuffer(data, dtype=self.dtype) if data else torch.empty(0, dtype=self.dtype)
        return self._flat


@dataclass
class TensorRef:
    """A tensor in a checkpoint, not yet read. :meth:`load` reads it (CPU)."""

    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    @property
    def shape(self) -> tuple:
        return tuple(self.size)

    @property
    def dtype(self) -> Any:
        return self.storage.dtype

    def load(self, where: str = "checkpoint") -> Any:
        """The tensor (CPU). A storage that is short or unreadable raises CodecError naming ``where``."""
        import torch

        try:
            size, stride = tuple(int(s) for s in self.size), tuple(int(s) for s in self.stride)
        except (TypeError, ValueError):
            raise CodecError(f"{where}: malformed checkpoint: a tensor's size is not a list of integers") from None
        if any(s < 0 for s in size) or any(s < 0 for s in stride) or len(size) != len(stride):
            raise CodecError(f"{where}: malformed checkpoint: a tensor has size {list(size)} and stride {list(stride)}")
        numel = 1
        for s in size:
            numel *= s
        if numel == 0:
            return torch.empty(size, dtype=self.storage.dtype)
        flat = self.storage.flat(where)
        offset = self.storage.element_offset + int(self.offset)
        extent = offset + 1 + sum((s - 1) * st for s, st in zip(size, stride))
        if extent > flat.numel() or offset < 0:
            raise CodecError(f"{where}: a tensor of shape {list(size)} reaches past the end of its storage: "
                             "the checkpoint is truncated or corrupt")
        return flat.as_strided(size, stride, offset)


# ---------------------------------------------------------------- tensor rebuilders
# These stand in for torch._utils' functions of the same names. They take only data.


def _rebuild_tensor(storage: Any, storage_offset: int, size: tuple, stride: tuple, *_: Any) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise CodecError("malformed checkpoint: a tensor's storage is not a storage record")
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise CodecError("malformed checkpoint: a tensor subclass is rebuilt by something other than a tensor rebuilder")
    return func(*args)


def _torch_device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


def _torch_size(*args: Any) -> tuple:
    return tuple(args[0]) if args else ()


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CodecError("malformed checkpoint: unexpected _codecs.encode call")
    return text.encode(encoding)


def _defaultdict(*_: Any) -> dict:
    # The default factory would be called on a missing key; a plain dict never calls it.
    return {}


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # copyreg._reconstructor, used by protocol 0/1 pickles of objects: only placeholders.
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)):
        raise CodecError(f"malformed checkpoint: copyreg._reconstructor of {cls!r}")
    return cls.__new__(cls)


_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("collections", "defaultdict"): _defaultdict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "device"): _torch_device,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
}

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}


@dataclass(frozen=True)
class AllowList:
    """The globals a restricted unpickler may resolve, each to a stand-in, never to the
    object the pickle names: ``exact`` maps ``(module, name)`` pairs; ``rules`` are tried in
    order for families of names (a namespace, the storage types) and return the stand-in or
    None. Both unpicklers in teal (torch checkpoints here, fairseq ``km.bin`` files in
    :mod:`teal_cli.cluster.kmbin`) resolve through one of these in ``find_class``."""

    exact: Mapping[tuple[str, str], Any]
    rules: tuple[Callable[[str, str], Any], ...] = ()

    def resolve(self, module: str, name: str, refuse: Callable[[str, str], Exception]) -> Any:
        """The stand-in for ``module.name``; raises ``refuse(module, name)`` when not allowed."""
        # Python-2 era names (protocol <= 2 pickles say '__builtin__ set'): map them as
        # pickle itself would, which only renames.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in self.exact:
            return self.exact[(module, name)]
        for rule in self.rules:
            found = rule(module, name)
            if found is not None:
                return found
        raise refuse(module, name)


def _storage_type(module: str, name: str) -> Any:
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
        import torch

        return _StorageType(getattr(torch, _STORAGE_DTYPES[name]))
    return None


def _torch_dtype(module: str, name: str) -> Any:
    if module == "torch" and name in _TORCH_DTYPE_NAMES:
        import torch

        return getattr(torch, name)  # a dtype constant, not a callable
    return None


def _data_class(module: str, name: str) -> Any:
    if (module, name) in _DATA_GLOBALS or any(module == ns.rstrip(".") or module.startswith(ns) for ns in _DATA_NAMESPACES):
        return _placeholder(module, name)
    return None


TORCH_CHECKPOINTS = AllowList(
    exact={**_FUNCTIONS, **{("builtins", name): value for name, value in _BUILTINS.items()}},
    rules=(_storage_type, _torch_dtype, _data_class),
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, where: str, persistent_load: Callable[[Any], Any] | None):
        super().__init__(file, encoding="latin1")
        self._where = where
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        return TORCH_CHECKPOINTS.resolve(module, name, self._refuse)

    def _refuse(self, module: str, name: str) -> CodecError:
        return CodecError(
            f"{self._where}: refusing to load: the pickle asks for '{module}.{name}', which is not tensor data "
            "(a checkpoint has no reason to name it; the file may be malicious). Nothing from it was run."
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise CodecError(f"{self._where}: malformed checkpoint: unexpected persistent id")
        return self._persistent(pid)


def _unpickle(stream: Any, where: str, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    try:
        return _RestrictedUnpickler(stream, where, persistent_load).load()
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - only our own stand-ins run: any failure means a damaged file
        raise CodecError(f"{where}: not a readable torch checkpoint, or a truncated/corrupt one "
                         f"({first_line(exc, 120)})") from None


def _storage_dtype(storage_type: Any, where: str) -> Any:
    if not isinstance(storage_type, _StorageType):
        raise CodecError(f"{where}: malformed checkpoint: storage of unknown type {storage_type!r}")
    return storage_type.dtype


def _load_zip(path: Path, where: str) -> Any:
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
        raise CodecError(f"{where}: a zip file without data.pkl is not a torch checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() not in (b"little", b""):
        raise CodecError(f"{where}: big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 4):
            raise CodecError(f"{where}: malformed checkpoint: unexpected persistent id {pid!r:.80}")
        dtype = _storage_dtype(pid[1], where)
        key = str(pid[2])
        if key not in storages:
            record = f"{prefix}data/{key}"
            if record not in names:
                raise CodecError(f"{where}: checkpoint is missing tensor data '{record}' (truncated download?)")
            storages[key] = _Storage(dtype, lambda record=record: archive.read(record))
        return storages[key]

    with archive.open(pkl[0]) as f:
        return _unpickle(io.BufferedReader(f), where, persistent_load)


def _load_legacy(path: Path, where: str) -> Any:
    roots: dict[str, _Storage] = {}
    offsets: dict[str, tuple[int, int]] = {}  # key -> (file offset of data, nbytes)

    def reader(key: str) -> Callable[[], bytes]:
        def read() -> bytes:
            start, nbytes = offsets[key]
            with open(path, "rb") as g:
                g.seek(start)
                data = g.read(nbytes)
            if len(data) != nbytes:
                raise CodecError(f"{where}: checkpoint is truncated")
            return data

        return read

    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            return pid[1]  # ('module', class, source file, source): the (placeholder) class
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 6):
            raise CodecError(f"{where}: malformed checkpoint: unexpected persistent id {pid!r:.80}")
        _, storage_type, root_key, _location, _numel, view = pid[:6]
        dtype = _storage_dtype(storage_type, where)
        root_key = str(root_key)
        if root_key not in roots:
            roots[root_key] = _Storage(dtype, reader(root_key))
        if view is not None:
            _view_key, view_offset, _view_size = view
            return _Storage(dtype, roots[root_key].read, element_offset=int(view_offset))
        return roots[root_key]

    with open(path, "rb") as f:
        # The stream: magic number, format version, system info, the object, the list
        # of storage keys, then each storage raw (int64 element count, then the bytes).
        if _unpickle(f, where) != _LEGACY_MAGIC:
            raise CodecError(f"{where}: not a torch checkpoint (neither a zip archive nor a legacy torch stream)")
        protocol = _unpickle(f, where)
        if protocol != _LEGACY_PROTOCOL:
            raise CodecError(f"{where}: unsupported legacy torch format version {protocol!r}")
        sys_info = _unpickle(f, where)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CodecError(f"{where}: big-endian checkpoints are not supported")
        result = _unpickle(f, where, persistent_load)
        keys = _unpickle(f, where)
        if not isinstance(keys, list):
            raise CodecError(f"{where}: malformed checkpoint: no storage list")
        for key in keys:
            key = str(key)
            if key not in roots:
                raise CodecError(f"{where}: malformed checkpoint: storage {key} listed but never used")
            head = f.read(8)
            if len(head) != 8:
                raise CodecError(f"{where}: checkpoint is truncated")
            (count,) = struct.unpack("<q", head)
            nbytes = count * roots[key].dtype.itemsize
            offsets[key] = (f.tell(), nbytes)
            f.seek(nbytes, io.SEEK_CUR)
    return result


def load(path: str | Path, *, what: str | None = None) -> Any:
    """Unpickle a torch checkpoint safely; tensors come back as :class:`TensorRef`.

    ``what`` names the file in error messages (defaults to the path). Raises
    :class:`~teal_cli.errors.CodecError` for a missing, corrupt or refused file.
    """
    path = Path(path)
    where = what or str(path)
    if not path.is_file():
        raise CodecError(f"{where}: no such checkpoint file")
    if zipfile.is_zipfile(path):
        try:
            return _load_zip(path, where)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CodecError(f"{where}: corrupt checkpoint archive ({exc})") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":  # a zip whose end (the central directory) is gone
        raise CodecError(f"{where}: truncated checkpoint: a zip archive without its central directory "
                         "(an interrupted download or copy?)")
    if not magic:
        raise CodecError(f"{where}: empty checkpoint file")
    return _load_legacy(path, where)


# ---------------------------------------------------------------- walking what came back


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, TensorRef]]:
    """``(dotted name, TensorRef)`` for every tensor in nested dicts (a state dict)."""
    if isinstance(obj, TensorRef):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))


def module_tensors(obj: Any, prefix: str = "") -> dict[str, TensorRef]:
    """The state dict of a pickled ``nn.Module`` (a :class:`Placeholder` tree).

    Walks ``_parameters``, ``_buffers`` (minus non-persistent ones) and ``_modules`` as
    ``nn.Module.state_dict`` would.
    """
    out: dict[str, TensorRef] = {}
    attrs = obj.attributes if isinstance(obj, Placeholder) else {}
    skip = attrs.get("_non_persistent_buffers_set") or ()
    for group in ("_parameters", "_buffers"):
        for name, value in (attrs.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, TensorRef):
                raise CodecError(f"pickled module: {prefix}{name} is not a tensor")
            out[prefix + name] = value
    for name, child in (attrs.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def load_tensors(refs: dict[str, TensorRef]) -> dict[str, Any]:
    """Read every :class:`TensorRef` of a flat dict into a CPU tensor."""
    return {name: ref.load() for name, ref in refs.items()}


def load_strict(model: "torch.nn.Module", refs: dict[str, TensorRef], where: str, *, ignore: tuple[str, ...] = (),
                hint: str = "") -> None:
    """Strict state-dict load with errors that name the file and the keys
    (:func:`teal_cli.weights.reader.check_shapes` first, so ``load_state_dict`` never fails)."""
    from .reader import check_shapes

    expected = model.state_dict()
    given = {k: v for k, v in refs.items() if not k.startswith(ignore)}
    check_shapes(expected, given, where, hint=hint)
    tensors = {name: given[name].load(where) if hasattr(given[name], "load") else given[name] for name in expected}
    model.load_state_dict(tensors, strict=True)
