"""Training checkpoints: everything a run needs to continue on the very same loss curve.

A checkpoint is a folder ``DIR/checkpoints/step-NNNNNNNN-RUN``::

    config.json, adapter.safetensors   # a complete model directory (TealModel.from_dir reads it)
    optimizer.safetensors              # AdamW's moments and step counts, by parameter index
    rng.safetensors                    # torch CPU / CUDA generator states (per rank)
    state.json                         # step, data position (epoch, batch), scheduler, options,
                                       # numpy / Python RNG states, optimizer hyper-parameters

It is written in a hidden temporary folder and renamed into place, then
``DIR/checkpoints/latest`` (one line, the folder's name) is replaced atomically, then
older checkpoints are removed: a kill at any moment leaves the previous checkpoint or the
new one, never half of one. No pickles: tensors in safetensors, the rest JSON.

Libraries' save-state helpers (``accelerate.save_state``) keep RNG states but not where
inside an epoch the run was; here the position is two integers, because the data order is
a pure function of ``(seed, epoch)`` (:meth:`teal_cli.train.data.SampleSet.epoch_batches`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..runtime.files import apply_umask, temp_dir_beside

if TYPE_CHECKING:
    import torch

    from ..model.teal_model import TealModel

FORMAT = "teal-train-state"
VERSION = 1
STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
LATEST = "latest"


def checkpoints_dir(directory: str | Path) -> Path:
    return Path(directory) / "checkpoints"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``DIR/checkpoints``, or None."""
    root = checkpoints_dir(directory)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if name and "/" not in name and (root / name / STATE_NAME).is_file():
            return root / name
    # A kill between the rename and the pointer update: the newest complete folder wins.
    found = sorted((p for p in root.glob("step-*") if (p / STATE_NAME).is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# The keys a resume reads, with their JSON types: a state.json without one is damaged.
REQUIRED = {"step": int, "epoch": int, "position": int, "total_steps": int, "finished": bool, "run": str,
            "trainable": list, "options": dict, "scheduler": dict, "optimizer_groups": list, "rng": dict}


def damaged(path: Path, what: str, reason: object) -> DataError:
    """The one-line error for an unreadable file of a checkpoint (every file says the same fix)."""
    checkpoint = path.parent
    return DataError(f"{path}: cannot read the {what} ({reason}); the checkpoint is damaged: delete "
                     f"{checkpoint} to start the run over (or {checkpoint.parent} to drop every checkpoint)")


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(path, "training state", exc) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("version"), int):
        raise DataError(f"{path}: not a teal training state")
    if state["version"] > VERSION:
        raise DataError(f"{path}: training state version {state['version']} is newer than this teal reads; upgrade teal")
    for key, kind in REQUIRED.items():
        if not isinstance(state.get(key), kind) or kind is int and isinstance(state.get(key), bool):
            raise damaged(path, "training state", f"'{key}' is missing or not a {kind.__name__}")
    return state


def save_checkpoint(directory: str | Path, model: "TealModel", optimizer: "torch.optim.Optimizer",
                    state: dict[str, Any], rng: dict[str, Any]) -> Path:
    """Write a checkpoint of ``model``'s adapter, ``optimizer`` and ``state`` (see the module
    docstring), point ``latest`` at it and remove older ones. Returns its folder."""
    from safetensors.torch import save_file

    root = checkpoints_dir(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:08d}-{state['run']}"
    final = root / name
    if (final / STATE_NAME).is_file():
        return final  # this very step is saved already (an interrupt right after a periodic save)
    tmp = temp_dir_beside(final)
    try:
        model.save(tmp)
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_NAME), metadata={"format": "teal-optimizer"})
        save_file(rng["tensors"], str(tmp / RNG_NAME), metadata={"format": "teal-rng"})
        full = {"format": FORMAT, "version": VERSION, **state, "optimizer_groups": groups, "rng": rng["json"]}
        (tmp / STATE_NAME).write_text(json.dumps(full, indent=1) + "\n")
        apply_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    for other in root.iterdir():
        if other.name not in (name, LATEST) and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
    return final


# ---------------------------------------------------------------------- optimizer


def optimizer_tensors(optimizer: "torch.optim.Optimizer") -> tuple[dict[str, "torch.Tensor"], list[dict[str, Any]]]:
    """An optimizer's state dict as flat tensors (``"{index}.{key}"``) and JSON-able groups."""
    import torch

    sd = optimizer.state_dict()
    tensors = {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}.{key}"] = tensor.detach().to("cpu").contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_tensors(path: Path, what: str) -> dict[str, "torch.Tensor"]:
    """A checkpoint's safetensors file, or the one-line error naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types, OSError and ValueError alike
        raise damaged(path, what, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def load_optimizer(optimizer: "torch.optim.Optimizer", checkpoint: Path, groups: list[dict[str, Any]]) -> None:
    """Load AdamW's state; every tensor must belong to a parameter of the same shape (a file
    from another run or model is refused as damaged rather than failing steps later)."""
    path = checkpoint / OPTIMIZER_NAME
    tensors = load_tensors(path, "optimizer state")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not key:
            raise damaged(path, "optimizer state", f"tensor '{name}' belongs to no trained parameter")
        if key in ("exp_avg", "exp_avg_sq") and tuple(tensor.shape) != tuple(params[int(index)].shape):
            raise damaged(path, "optimizer state", f"tensor '{name}' has shape {list(tensor.shape)}, "
                                                   f"its parameter {list(params[int(index)].shape)}")
        state.setdefault(int(index), {})[key] = tensor
    fixed = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": fixed})
    except (ValueError, KeyError, TypeError) as exc:
        raise damaged(path.parent / STATE_NAME, "optimizer groups", exc) from None


# ---------------------------------------------------------------------- RNG


def rng_states() -> dict[str, Any]:
    """This process's RNG states: torch CPU and CUDA as tensors, numpy and Python as JSON."""
    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, inner, gauss = random.getstate()
    return {"tensors": tensors,
            "json": {"numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(inner), gauss]}}


def gather_rng(dist) -> dict[str, Any]:
    """Every rank's RNG states in one dict (rank 0's under the plain keys, others prefixed)."""
    mine = rng_states()
    if dist.world == 1:
        return mine
    everyone = dist.gather_objects({"tensors": {k: v.tolist() for k, v in mine["tensors"].items()}, "json": mine["json"]})
    import torch

    out = {"tensors": dict(mine["tensors"]), "json": dict(mine["json"])}
    for rank, other in enumerate(everyone or []):
        if rank == 0:
            continue
        for k, v in other["tensors"].items():
            out["tensors"][f"rank{rank}.{k}"] = torch.tensor(v, dtype=torch.uint8)
        out["json"][f"rank{rank}"] = other["json"]
    return out


def restore_rng(checkpoint: Path, state: dict[str, Any], rank: int = 0) -> None:
    """Set this process's RNG states from a checkpoint (its own rank's where saved)."""
    import numpy as np
    import torch

    path = checkpoint / RNG_NAME
    tensors = load_tensors(path, "RNG states")
    prefix = f"rank{rank}." if rank and f"rank{rank}.torch" in tensors else ""
    try:
        torch.set_rng_state(tensors[f"{prefix}torch"])
        if torch.cuda.is_available():
            cuda = sorted(k for k in tensors if k.startswith(f"{prefix}cuda."))
            if cuda and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise damaged(path, "RNG states", f"{type(exc).__name__}: {exc}") from None
    try:
        saved = state["rng"].get(f"rank{rank}", state["rng"]) if rank else state["rng"]
        kind, keys, pos, has_gauss, cached = saved["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, inner, gauss = saved["python"]
        random.setstate((version, tuple(inner), gauss))
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise damaged(checkpoint / STATE_NAME, "RNG states", f"{type(exc).__name__}: {exc}") from None
