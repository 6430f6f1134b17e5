"""Data-parallel training through torch.distributed, as ``torchrun`` and ``accelerate launch`` start it.

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``
in each process's environment; with ``WORLD_SIZE`` above 1 the trainer joins the process
group (NCCL on GPUs, gloo on CPUs) and wraps its step in
:class:`torch.nn.parallel.DistributedDataParallel`, which averages gradients across ranks.
Nothing here moves tensors by hand: gradients go through DDP, the few metrics through
``all_reduce``. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Distributed:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Distributed":
        """Join the process group when a launcher started several processes (no-op otherwise)."""
        for key, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
            if os.environ.get(key, "").lower() in ("1", "true"):
                from ..errors import UsageError

                raise UsageError(f"teal train runs data-parallel (DDP) only; accelerate's {what} config is not supported: "
                                 "launch with 'accelerate launch --multi_gpu' or torchrun")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        started = False
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                import torch

                torch.cuda.set_device(local)
            dist.init_process_group(backend=backend)
            started = True
        return cls(rank=rank, world=world, local_rank=local, started_here=started)

    def all_reduce_sum(self, tensor):
        """Sum ``tensor`` over ranks in place (returns it)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any] | None:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.started_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def wrap(self, module, device):
        """``module`` inside DDP when there are several ranks, else unchanged.

        ``find_unused_parameters``: a batch without audio leaves the audio head without a
        gradient on that rank, which DDP must know to not wait for it."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
