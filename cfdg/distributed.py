"""Process-group helpers for `torchrun` (DDP) runs; each function also works in one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cfdg.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of the current process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_torchrun() -> bool:
    """Return True when `torchrun` started this process (its RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_device(name: str | None) -> None:
    """Raise UserError unless `name` is auto (or None), cpu, or a CUDA device this machine has."""
    if name in (None, "", "auto"):
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"device {name!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "cpu":
        if device.index not in (None, 0):
            raise UserError(f"invalid device {name!r}; use cpu without an index")
    else:
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")


def setup(device: str | None = None) -> DistInfo:
    """Initialise the default process group under `torchrun`, or describe a single process.

    NCCL is used when CUDA is available, gloo otherwise. Calling it twice is harmless.

    Args:
        device: "cpu", "cuda" or None for CUDA when available.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not is_torchrun():
        dev = (
            torch.device("cuda" if use_cuda else "cpu") if device is None else torch.device(device)
        )
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Return the mean of `value` over all ranks (the value itself in one process)."""
    if not is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_cat(value: torch.Tensor) -> torch.Tensor:
    """Concatenate `value` from every rank along dim 0, in rank order; sizes may differ per rank."""
    if not is_initialized():
        return value
    world = dist.get_world_size()
    size = torch.tensor([value.shape[0]], device=value.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    max_size = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_size, *value.shape[1:]), dtype=value.dtype, device=value.device)
    padded[: value.shape[0]] = value
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)], dim=0)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
