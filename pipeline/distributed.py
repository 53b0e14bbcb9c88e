"""torchrun, the one way: join the job named by WORLD_SIZE/RANK, collectives, barriers.

Extraction and training share this. NCCL on GPUs (one per rank, selected before the first
collective), gloo on CPUs. A plain run is rank 0 of 1 and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly); collectives run on `device`."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """All-reduce and average gradients: the heads are tiny, so no DDP wrapper is needed."""
        if self.world == 1:
            return
        for p in parameters:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over ranks (float64)."""
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor over ranks."""
        if self.world == 1:
            return mask
        values = mask.to(self.device, torch.int32)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return values.bool().to(mask.device)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of a float tensor over ranks."""
        if self.world == 1:
            return values
        out = values.detach().to(self.device, torch.float32).clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return out.to(values.device, values.dtype)

    def min(self, value: float) -> float:
        """The smallest of one number over ranks (float64)."""
        if self.world == 1:
            return value
        out = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN)
        return float(out)

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a float tensor over ranks."""
        if self.world == 1:
            return values
        out = values.detach().to(self.device, torch.float32).clone()
        torch.distributed.all_reduce(out)
        return out.to(values.device, values.dtype)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """The job's last step on every rank: wait for the others, then leave the process group, so no rank
        exits with gloo's threads still running (which can abort it: "terminate called without an active
        exception")."""
        if self.world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device | str) -> Distributed:
    """Join the torchrun job named by WORLD_SIZE/RANK: NCCL on GPUs (one per rank), gloo on CPUs."""
    device = torch.device(device)
    if not under_torchrun():
        return Distributed(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)
