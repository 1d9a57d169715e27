"""Several processes, one result, through torch.distributed (launched by torchrun, or `boa quantize --nproc N`):
each rank sees a share of the calibration windows, statistics are summed across ranks (`sum_`), each layer is
solved on one owner rank (`owners`) and its result broadcast (`broadcast_`). One process is the same code with
`Ranks.single()`, whose collectives do nothing.

A rank that dies makes the others' next collective fail (gloo: the connection closes; every collective also has
the group's timeout), which `collective` turns into a BoaError naming what was being exchanged.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from boa.core.errors import BoaError

DEFAULT_TIMEOUT = timedelta(minutes=30)  # one block's solve on the slowest rank must fit in it


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def single(cls) -> "Ranks":
        return cls()

    @classmethod
    def current(cls) -> "Ranks":
        """The initialised process group's ranks, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the checkpoint's progress, saves and reports."""
        return self.rank == 0

    def share(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's calibration windows: a contiguous share, sizes differing by at most one."""
        if windows.shape[0] < self.world:
            raise BoaError(f"{windows.shape[0]} calibration windows cannot be shared by {self.world} processes; use "
                           f"at least {self.world} windows (--nsamples) or fewer processes (--nproc)")
        return windows.tensor_split(self.world)[self.rank]

    def sum_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """tensor summed over the ranks, in place (every rank gets the total)."""
        if self.distributed:
            with collective(what):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, source: int, what: str) -> torch.Tensor:
        """`source`'s tensor on every rank, in place."""
        if self.distributed:
            with collective(what):
                dist.broadcast(tensor, src=source)
        return tensor

    def barrier(self, what: str) -> None:
        if self.distributed:
            with collective(what):
                dist.barrier()

    def owners(self, costs: dict[str, float]) -> dict[str, int]:
        """An owner rank per item, balancing the summed costs (largest first, each to the least loaded rank;
        deterministic, so every rank computes the same assignment)."""
        load = [0.0] * self.world
        owners = {}
        for name in sorted(costs, key=lambda n: (-costs[n], n)):
            owner = min(range(self.world), key=lambda r: (load[r], r))
            owners[name] = owner
            load[owner] += costs[name]
        return owners


@contextlib.contextmanager
def collective(what: str):
    """Turns a failed collective (a rank died, or timed out) into a BoaError naming what was being exchanged."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError if hasattr(dist, "DistBackendError") else RuntimeError) as err:
        raise BoaError(f"another process of this run stopped or timed out while exchanging {what} "
                       f"({' '.join(str(err).split())[:300]}); see that rank's own error above, fix it and rerun with "
                       "--resume") from None


def init_from_environment(device: torch.device | None, timeout: timedelta = DEFAULT_TIMEOUT) -> Ranks:
    """Joins the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL for CUDA devices,
    gloo for the CPU. Returns the ranks; a single process when not launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return Ranks.current()
    if not dist.is_available():
        raise BoaError("this torch was built without torch.distributed; run one process")
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout)
    return Ranks.current()


def local_device(device: torch.device) -> torch.device:
    """The GPU of this process on its node (cuda:LOCAL_RANK) when several processes share a node's GPUs."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
