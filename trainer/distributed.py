"""Distributed set-up for `torchrun`: one process per device, gloo on CPU, NCCL on GPU.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them this is a
single-process run and nothing is initialised. Only rank 0 prints, logs metrics and writes checkpoints.

Randomness (docs/design.md "Randomness"): model init is identical on every rank (seeded before the model
is built); every training step then reseeds the global generators from (seed, rank, step), so drop
path, erasing noise and anything else drawn from them differ by rank and step and replay exactly.
Control flags ("out of data", "stop requested") are agreed over a CPU (gloo) group, so asking costs no
wait for the GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from labeler.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo for CPU, NCCL for CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    global _CONTROL_GROUP
    if world_size > 1 and _CONTROL_GROUP is None:
        # Every rank must create groups in the same order: here, right after the default group.
        _CONTROL_GROUP = dist.new_group(backend="gloo") if dev.type == "cuda" else dist.group.WORLD
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP wrap when distributed (build the optimizer and EMA from the unwrapped model first)."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (its state_dict has no prefixes)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


_CONTROL_GROUP = None
_STEP_TAG = 0x5253_5450  # "RSTP"


def step_seed(seed: int, rank: int, step: int) -> int:
    """The global generators' seed for one training step of one rank (63 bits)."""
    state = np.random.SeedSequence(int(seed), spawn_key=(_STEP_TAG, int(rank), int(step))).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_step(seed: int, rank: int, step: int) -> None:
    """Reseed torch's CPU and CUDA generators for (seed, rank, step): a host-side call, no device sync.

    Not `torch.manual_seed`, which also seeds every other backend torch knows; one not started (XPU, MTIA,
    CUDA on a CPU run) queues the seed with a formatted stack trace of the caller, at every step. CUDA is
    started before the first step of a GPU run (the model is on it)."""
    value = step_seed(seed, rank, step)
    torch.default_generator.manual_seed(value)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(value)


def any_rank(info: DistInfo, *flags: bool) -> list[bool]:
    """For each flag: is it set on any rank? A CPU all-reduce (gloo), so the GPU queue is never waited on."""
    return [total > 0 for total in sum_over_ranks(info, *(int(bool(f)) for f in flags))]


def sum_over_ranks(info: DistInfo, *counts: int) -> list[int]:
    """Host integers (skipped samples, flags) summed over ranks on the CPU (gloo) group: a device tensor and
    `.item()` would wait for every step still queued on the GPU."""
    if not info.distributed:
        return [int(c) for c in counts]
    t = torch.tensor([int(c) for c in counts], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_CONTROL_GROUP)
    return [int(v) for v in t.tolist()]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a device tensor over ranks (identity on one process): gradients, eval counts."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown_distributed(info: DistInfo) -> None:
    global _CONTROL_GROUP
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None
