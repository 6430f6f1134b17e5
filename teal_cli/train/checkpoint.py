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
        name = pointer.read_text().strip()
        if name and (root / name / STATE_NAME).is_file():
            return root / name
    # A kill between the rename and the pointer update: the newest complete folder wins.
    found = sorted((p for p in root.glob("step-*") if (p / STATE_NAME).is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the training state ({exc}); delete {checkpoint.parent} to start over") from None
    if state.get("format") != FORMAT or not isinstance(state.get("version"), int):
        raise DataError(f"{path}: not a teal training state")
    if state["version"] > VERSION:
        raise DataError(f"{path}: training state version {state['version']} is newer than this teal reads; upgrade teal")
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


def load_optimizer(optimizer: "torch.optim.Optimizer", checkpoint: Path, groups: list[dict[str, Any]]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / OPTIMIZER_NAME))
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    fixed = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": fixed})


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
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / RNG_NAME))
    prefix = f"rank{rank}." if rank and f"rank{rank}.torch" in tensors else ""
    torch.set_rng_state(tensors[f"{prefix}torch"])
    if torch.cuda.is_available():
        cuda = sorted(k for k in tensors if k.startswith(f"{prefix}cuda."))
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    saved = state["rng"].get(f"rank{rank}", state["rng"]) if rank else state["rng"]
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, inner, gauss = saved["python"]
    random.setstate((version, tuple(inner), gauss))
