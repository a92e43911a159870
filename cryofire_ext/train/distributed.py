"""Data parallelism through torchrun, one code path: a world of one is the ordinary run.

`torchrun --nproc_per_node N cryofire train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we
then join a process group (gloo on CPU, nccl on CUDA), convert BatchNorm to
SyncBatchNorm (so the global batch normalises as in one process) and wrap the model
in DistributedDataParallel. Each rank takes an equal slice of every global batch;
only rank 0 writes files. `cryofire predict` under torchrun gives each rank a contiguous block of the
particles (`block`) and gathers the per-particle results in input order on every rank (`gather_blocks`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items):
        """This rank's equal slice of a global batch (contiguous blocks)."""
        n = len(items)
        per = n // self.world
        return items[self.rank * per:(self.rank + 1) * per]


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        from cryofire_ext.errors import InputError

        raise InputError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    return torch.device(device)


def setup(device: str) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return DistEnv(0, 1, dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch of all ranks, differentiable, on any device (torch's SyncBatchNorm
    is CUDA-only): per-channel sums and counts are all-reduced with autograd-aware collectives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat((x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count)))
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
            self.num_batches_tracked.add_(1)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def _global_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm2d a GlobalBatchNorm2d in place (the same Parameter objects, so an optimiser
    built before keeps working)."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = GlobalBatchNorm2d
    return module


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """Global-batch BatchNorm + DDP in a world > 1; the model itself otherwise."""
    if env.world <= 1:
        return model
    if env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = _global_batchnorm(model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def all_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks (identity in a world of one)."""
    if env.world <= 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / env.world


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def finish() -> None:
    """Leave the process group `setup` joined, if any: a process that exits with gloo's threads still running may
    abort ("terminate called without an active exception") after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistEnv:
    """The world this process is in (joined by `setup`): its rank and size; a world of one on the CPU otherwise."""
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    return DistEnv(0, 1, torch.device("cpu"))


def block(n: int, env: DistEnv) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous block of `n` items (sizes differ by at most one)."""
    edges = [n * r // env.world for r in range(env.world + 1)]
    return edges[env.rank], edges[env.rank + 1]


def gather_blocks(arrays: dict, env: DistEnv) -> dict:
    """{name: `(m_r, ...)` numpy array of this rank's block} -> {name: every rank's blocks concatenated in rank
    order} on every rank (the input itself in a world of one)."""
    if env.world <= 1:
        return arrays
    parts: list = [None] * env.world
    dist.all_gather_object(parts, arrays)
    return {name: np.concatenate([p[name] for p in parts]) for name in arrays}
