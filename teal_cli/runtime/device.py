"""Device and dtype choice in one place: ``auto`` means CUDA when available."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(spec: "str | torch.device" = "auto") -> "torch.device":
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a torch.device) to a torch device, checking it exists."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        index = spec.partition(":")[2]
        if index:
            if not index.isdigit():
                raise UsageError(f"--device {spec}: expected cuda:N with N a GPU index")
            if int(index) >= torch.cuda.device_count():
                raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device(spec)
    raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


def fit_threads_to_cpus() -> int:
    """Cut torch's CPU threads to the CPUs this process may use (:func:`teal_cli.runtime.cpus.usable_cpus`:
    the affinity mask and a cgroup quota, which torch does not see: in a container limited to
    4 CPUs of a 64-core host it would run 64 threads, throttled), unless ``OMP_NUM_THREADS``
    sets them. Returns torch's thread count."""
    import os

    import torch

    from .cpus import usable_cpus

    if not os.environ.get("OMP_NUM_THREADS"):
        cpus = usable_cpus()
        if torch.get_num_threads() > cpus:
            torch.set_num_threads(cpus)
    return torch.get_num_threads()


def resolve_dtype(spec: "str | torch.dtype", device: "torch.device", *, llm: bool = False) -> "torch.dtype":
    """``auto`` is bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU; with
    ``llm`` (the frozen LLM's dtype in train, generate and eval) bf16 on a CPU that computes
    bf16 natively (:func:`cpu_auto_dtype`). teal's own parameters stay fp32 (master weights
    in training) and its heads take the LLM's hidden states in fp32; feature encoders and
    codecs keep fp32 on every CPU (their ids must not depend on the machine).

    A torch.dtype passes through unchanged."""
    import torch

    if isinstance(spec, torch.dtype):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec not in DTYPES:
        raise UsageError(f"--dtype {spec}: expected one of {', '.join(DTYPES)}")
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and llm:
            return cpu_auto_dtype()
        return torch.float32
    return getattr(torch, spec)


def transformers_dtype(dtype: "torch.dtype") -> dict:
    """The ``from_pretrained`` keyword for a parameter dtype: transformers >= 4.56 calls it
    ``dtype``; older versions (which teal allows) ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


# x86 flags (/proc/cpuinfo) of CPUs with bf16 dot-product instructions: AVX512_BF16 (Zen 4/5,
# Cooper Lake, Sapphire Rapids) and AMX-BF16 (Sapphire Rapids and later). Without them torch
# emulates bf16 matrix products through fp32 and they run slower than fp32's.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_DTYPE_RECORD = "cpu-dtype.json"  # in $TEAL_CACHE_DIR: the probe's answer per CPU model and torch version


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``'s first ``flags`` line; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def bf16_sane() -> bool:
    """A tiny bf16 matrix product agrees with fp32's to bf16's precision (a CPU kernel that
    returned garbage for bf16 would make ``auto`` pick it otherwise)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 128, generator=g), torch.randn(128, 32, generator=g)
    ref = a.bfloat16().float() @ b.bfloat16().float()
    got = (a.bfloat16() @ b.bfloat16()).float()
    return bool(torch.isfinite(got).all()) and bool(torch.allclose(got, ref, rtol=2e-2, atol=2e-1))


def probe_cpu_dtype(flags: "set[str] | None" = None) -> str:
    """``bfloat16`` when the CPU has a native bf16 instruction (:data:`BF16_FLAGS`) and
    :func:`bf16_sane`, else ``float32``."""
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if any(f in flags for f in BF16_FLAGS) and bf16_sane() else "float32"


def cpu_auto_dtype() -> "torch.dtype":
    """``--dtype auto``'s CPU answer, probed once per CPU model and torch version and kept in
    ``$TEAL_CACHE_DIR/cpu-dtype.json`` (written atomically; an unreadable file is probed again)."""
    import json

    import torch

    from .files import atomic_output, cache_dir

    key = f"{cpu_model()} | torch {torch.__version__}"
    path = cache_dir() / CPU_DTYPE_RECORD
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    answer = known.get(key)
    if answer not in ("bfloat16", "float32"):
        answer = probe_cpu_dtype()
        known[key] = answer
        try:
            with atomic_output(path) as f:
                json.dump(known, f, indent=1, sort_keys=True)
                f.write("\n")
        except OSError:
            pass  # a read-only cache: probe again next time
    return getattr(torch, answer)


def autocast(device: "torch.device", dtype: "torch.dtype"):
    """Autocast on GPU for half dtypes; a no-op context on CPU or fp32."""
    import torch

    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


_COPY_STREAMS: dict = {}


def upload(host: "torch.Tensor", device: "torch.device") -> "torch.Tensor":
    """``host`` on ``device``; on CUDA copied on a side stream from pinned memory.

    The copy engine then fills batch N+1 while the current stream still computes batch N (a
    copy queued on the current stream waits for that work and holds up the next): the
    current stream waits for the copy on the device, never the host. ``host`` must be
    pinned (``pin_memory=True``) for the copy to be asynchronous, and left unchanged
    afterwards.
    """
    import torch

    if device.type != "cuda":
        return host.to(device)
    device = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    stream = _COPY_STREAMS.get(device)
    if stream is None:
        stream = _COPY_STREAMS[device] = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        out = host.to(device, non_blocking=True)
    current.wait_stream(stream)
    out.record_stream(current)  # its memory is not reused before the current stream is done with it
    return out


def upload_flat(tensors: "list[torch.Tensor]", device: "torch.device", dtype=None) -> "list[torch.Tensor]":
    """Host tensors on ``device`` (as ``dtype``), packed end to end into one pinned buffer and
    sent with one :func:`upload`. Copying each from pageable memory instead makes the host
    wait, at every copy, for the device to finish the work queued before it (CUDA syncs the
    stream before a pageable upload), which leaves the device idle while the host prepares
    the next batch. Tensors already on ``device`` (or any, off CUDA) are just converted."""
    if not tensors:
        return []
    dtype = dtype or tensors[0].dtype
    if device.type != "cuda" or any(t.device.type != "cpu" for t in tensors):
        return [t.to(device, dtype) for t in tensors]
    return unpack(upload(pack(tensors, dtype, pin_memory=True), device), tensors)


def upload_rows(tensors: "list[torch.Tensor]", width: int, device: "torch.device", dtype=None) -> "torch.Tensor":
    """Host tensors as the zero-padded rows of one ``[len(tensors), width]`` tensor on ``device``.

    On CUDA the rows are laid out, padding zeroed, in one pinned host buffer and sent with
    one :func:`upload`: a single copy on the device, where zero-filling it and copying each
    row in would launch a kernel per row. Elsewhere (or for tensors already on a device) the
    rows are filled on ``device``."""
    import torch

    dtype = dtype or tensors[0].dtype
    pinned = device.type == "cuda" and all(t.device.type == "cpu" for t in tensors)
    rows = (torch.empty if pinned else torch.zeros)(len(tensors), width, dtype=dtype, pin_memory=pinned,
                                                     device="cpu" if pinned else device)
    for row, t in zip(rows, tensors):
        n = t.numel()
        row[:n].copy_(t.reshape(-1))
        if pinned:
            row[n:].zero_()
    return upload(rows, device) if pinned else rows


def pack(tensors: "Sequence[torch.Tensor | np.ndarray]", dtype, pin_memory: bool = False) -> "torch.Tensor":
    """``tensors`` (tensors, or numpy arrays of a dtype numpy shares with ``dtype``: decoded
    images are read-only arrays, which torch will not wrap) flattened end to end into one new
    1-D host tensor of ``dtype``."""
    import math

    import torch

    sizes = [math.prod(t.shape) for t in tensors]
    packed = torch.empty(sum(sizes), dtype=dtype, pin_memory=pin_memory)
    host, start = None, 0
    for t, n in zip(tensors, sizes):
        if isinstance(t, torch.Tensor):
            packed[start : start + n].copy_(t.reshape(-1))
        else:
            host = packed.numpy() if host is None else host
            host[start : start + n] = t.reshape(-1)
        start += n
    return packed


def unpack(packed: "torch.Tensor", like: "Sequence[torch.Tensor | np.ndarray]") -> "list[torch.Tensor]":
    """Views of ``packed`` (from :func:`pack`) shaped as ``like``."""
    import math

    parts = packed.split([math.prod(t.shape) for t in like])
    return [part.view(tuple(t.shape)) for part, t in zip(parts, like)]


def host_copy_later(tensor: "torch.Tensor") -> "Callable[[], torch.Tensor]":
    """Start copying ``tensor`` to the host; the returned function waits for it and returns it.

    On CUDA the copy goes to pinned memory behind an event, so waiting covers the work queued
    before this call only: the host can read batch N's results while batch N+1 runs, where a
    plain ``.cpu()`` would also wait for batch N+1. Elsewhere the tensor itself is returned.
    """
    import torch

    if tensor.device.type != "cuda":
        return lambda: tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensor.device))

    def wait() -> "torch.Tensor":
        done.synchronize()
        return host

    return wait


def seed_everything(seed: int | None) -> None:
    if seed is None:
        return
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
