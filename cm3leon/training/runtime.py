"""Process-level setup: torch.distributed under torchrun, device choice, and RNG state capture/restore."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import ParallelSection

__all__ = ["Runtime", "init_runtime", "rng_state", "set_rng_state"]


@dataclass(frozen=True)
class Runtime:
    """Where this process sits: ``rank`` of ``world_size``, its device, and whether the trainer created the
    process group (and so destroys it at the end)."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """In-place all-reduce (sum by default) on the group's device; a no-op on one process."""
        if self.distributed:
            t = tensor.to(self.comm_device)
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
            tensor.copy_(t.to(tensor.device))
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and self.distributed:
            dist.destroy_process_group()


class LaunchError(ValueError):
    """The config cannot run in this process as launched (parallel mode without torchrun, a missing device or
    ``checkpoint.init_from`` path): raised before any work; the command line exits with status 2."""


def init_runtime(parallel: ParallelSection) -> Runtime:
    """Joins (or creates, under torchrun) the process group ``parallel.mode`` needs and picks the device.

    A process group that already exists (a test or a launcher created it) is used as is. ``mode="none"``
    refuses to run inside a multi-process group: every rank would train its own copy.
    """
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = parallel.device == "cuda" or (parallel.device == "auto" and torch.cuda.is_available())
    if parallel.device == "cuda" and not torch.cuda.is_available():
        raise LaunchError("parallel.device='cuda' but CUDA is not available")
    owns = False
    if parallel.mode == "none":
        if (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or world_env > 1:
            raise LaunchError("parallel.mode='none' under a multi-process launch: set parallel.mode to 'ddp' "
                              "or 'fsdp'")
    elif not dist.is_initialized():
        if "RANK" not in os.environ:
            raise LaunchError(f"parallel.mode={parallel.mode!r} needs a process group: launch with torchrun "
                              "(torchrun --nproc-per-node N -m cm3leon.training ...)")
        backend = parallel.backend if parallel.backend != "auto" else ("nccl" if want_cuda else "gloo")
        dist.init_process_group(backend)
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, world_size=world, device=device, owns_group=owns)


def rng_state() -> dict[str, Any]:
    """Every random generator this process uses: torch (CPU and CUDA), numpy's global, Python's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
