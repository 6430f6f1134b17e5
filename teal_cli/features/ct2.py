"""Read CTranslate2 ``model.bin`` files (the faster-whisper format) without CTranslate2.

The layout, as CTranslate2's ``ModelSpec._serialize`` writes it (little-endian)::

    u32 binary_version
    str spec_name, u32 spec_revision              (version >= 2)
    u32 n_variables, then per variable:
        str name, u8 rank, u32 dims[rank],
        u8 dtype_id, u32 n_bytes, raw bytes        (version >= 4)
        u8 item_size, u32 n_items, raw bytes       (version < 4)
    u32 n_aliases, then (str alias, str target)    (version >= 3)

where ``str`` is a u16 length (counting a trailing NUL), the UTF-8 bytes and the NUL, and
dtype ids follow CTranslate2's ``DataType`` enum: float32, int8, int16, int32, float16,
bfloat16. Quantized weights come with a ``<name>_scale`` variable: CTranslate2 stores
``round(w * scale)``, so ``w = q / scale`` (one scale per output row for int8, one for the
whole matrix for int16).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CodecError

if TYPE_CHECKING:
    import torch

_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_ITEM_SIZE_DTYPES = {1: "int8", 2: "float16", 4: "float32"}  # files older than version 4
MAX_BINARY_VERSION = 6


class _Reader:
    def __init__(self, data: bytes | memoryview, where: str):
        self.data = data
        self.pos = 0
        self.where = where

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CodecError(f"{self.where}: truncated CTranslate2 model file (wanted {n} bytes at offset {self.pos})")
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        values = struct.unpack("<" + fmt, self.take(size))
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        length = self.unpack("H")
        raw = bytes(self.take(length))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{self.where}: corrupt CTranslate2 model file (a name at offset {self.pos - length} "
                             "is not UTF-8)") from None


def read_model_bin(path: str | Path) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """Every variable of a CTranslate2 ``model.bin`` as a CPU tensor, aliases resolved.

    Returns ``(variables, header)`` with header ``{"version", "spec", "revision"}``. Tensors
    keep their stored dtype (``float16``, ``int8``...); see :func:`dequantize`.
    """
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise CodecError(f"{path}: CTranslate2 model file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CodecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    r = _Reader(data, str(path))
    version = r.unpack("I")
    if version > MAX_BINARY_VERSION or version < 1:
        raise CodecError(f"{path}: not a CTranslate2 model file, or of an unsupported binary version "
                         f"({version}; this teal reads 1..{MAX_BINARY_VERSION})")
    spec, revision = "", 1
    if version >= 2:
        spec = r.string()
        revision = r.unpack("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        rank = r.unpack("B")
        shape = [r.unpack("I") for _ in range(rank)]
        if version >= 4:
            type_id = r.unpack("B")
            if type_id >= len(_DTYPES):
                raise CodecError(f"{path}: variable {name} has unknown dtype id {type_id}")
            dtype = _DTYPES[type_id]
            n_bytes = r.unpack("I")
        else:
            item_size = r.unpack("B")
            dtype = _ITEM_SIZE_DTYPES.get(item_size, "")
            if not dtype:
                raise CodecError(f"{path}: variable {name} has unsupported item size {item_size}")
            n_bytes = r.unpack("I") * item_size
        raw = r.take(n_bytes)
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        count = 1
        for d in shape:
            count *= d
        if count * itemsize != n_bytes:
            raise CodecError(f"{path}: corrupt CTranslate2 model file: variable {name} of shape {shape} ({dtype}) "
                             f"holds {n_bytes} bytes")
        if dtype == "bfloat16":
            array = np.frombuffer(raw, dtype=np.int16).copy()
            tensor = torch.from_numpy(array).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(dtype)).copy())
        variables[name] = tensor.reshape(shape)
    if version >= 3:
        for _ in range(r.unpack("I")):
            alias, target = r.string(), r.string()
            if target in variables:
                variables[alias] = variables[target]
    if r.pos != len(data):
        raise CodecError(f"{path}: corrupt CTranslate2 model file ({len(data) - r.pos} bytes after its last entry)")
    return variables, {"version": version, "spec": spec, "revision": revision}


def dequantize(variables: dict[str, "torch.Tensor"], name: str) -> "torch.Tensor":
    """``variables[name]`` as float32, undoing CTranslate2's int8/int16 quantization."""
    import torch

    value = variables[name]
    scale = variables.get(name + "_scale")
    if value.dtype in (torch.int8, torch.int16) and scale is not None:
        scale = scale.float()
        if scale.numel() not in (1, value.shape[0] if value.dim() else 1):
            raise CodecError(f"variable {name}_scale has {scale.numel()} values for {name} of shape {list(value.shape)}")
        if scale.dim() == 0 or scale.numel() == 1:
            return value.float() / scale.reshape(())
        shape = [-1] + [1] * (value.dim() - 1)
        return value.float() / scale.reshape(shape)
    if value.dtype in (torch.int8, torch.int16, torch.int32) and value.dim() > 0:
        raise CodecError(f"variable {name} is an integer tensor without a {name}_scale: cannot dequantize it")
    return value.float()
