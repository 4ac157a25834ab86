"""How a labeling worker runs the teacher (`WorkerSettings`, validated at construction), and the settings
resolved against the device it runs on: store writer processes and shards in flight (`labeler.work_unit`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from labeler.decode_workers import resolve_decode_pool, resolve_decode_workers
from labeler.teacher import resolve_channels_last, resolve_compile, resolve_cuda_graph

RENDER_BACKENDS = ("auto", "torch", "pillow")
DECODE_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs the teacher; what it computes comes from the labeler's spec in the store."""

    checkpoint: str | None
    batch_size: int = 256  # views per forward pass (rounded down to whole images: S views each)
    amp: str = "bf16"
    compile: bool | str = "auto"  # auto = torch.compile on CUDA, eager on CPU
    cuda_graph: bool | str = "auto"  # auto = on CUDA: a batch's forward + top-k is one captured graph launch
    channels_last: bool | str = "auto"  # auto = on CUDA: the teacher's weights and input in channels-last memory
    device: str = "auto"  # auto = cuda if available, else cpu
    render_backend: str = "auto"  # auto = batched torch on cuda, Pillow (the reference renderer) on cpu
    decode_workers: int = 0  # 0 = one per CPU this worker may use
    decode_pool: str = "auto"  # auto = processes on cuda, threads on cpu (see labeler.decode_workers)
    shards_in_flight: int = 0  # 0 = decode processes + 2 (process pool) or 1 (thread pool)
    decode_device: str = "cpu"  # cuda = decode baseline JPEGs with nvJPEG (torchvision); others stay on Pillow
    store_writers: int = -1  # shard writes in this many processes; -1 = 4 with decode processes, else 0 (in-thread)
    dump_views_dir: str | None = None  # debug hook: save every rendered view of a shard (tests)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.render_backend not in RENDER_BACKENDS:
            raise ValueError(f"render_backend must be one of {RENDER_BACKENDS}, got {self.render_backend!r}")
        resolve_decode_workers(self.decode_workers)  # the resolvers' own checks: one message per setting
        resolve_decode_pool(self.decode_pool, "cpu")
        resolve_compile(self.compile, torch.device("cpu"))
        resolve_cuda_graph(self.cuda_graph, torch.device("cuda"))  # the value; "true" on CPU fails at build time
        resolve_channels_last(self.channels_last, torch.device("cpu"))
        if self.shards_in_flight < 0:
            raise ValueError(f"shards_in_flight must be >= 0 (0 = automatic), got {self.shards_in_flight}")
        if self.store_writers < -1:
            raise ValueError(f"store_writers must be >= 0, or -1 for automatic, got {self.store_writers}")
        if self.decode_device not in DECODE_DEVICES:
            raise ValueError(f"decode_device must be one of {DECODE_DEVICES}, got {self.decode_device!r}")


AUTO_STORE_WRITERS = 4  # a 143-image FAN-S shard is ~0.25 CPU-s to write: 4 keep up with 8 shards/s, twice over


def resolve_store_writers(settings: WorkerSettings, device_type: str) -> int:
    """Store writer processes of a work unit: with decode processes (GPU nodes) `AUTO_STORE_WRITERS`, so the
    writes leave the device loop's process; with decode threads none (the caller thread writes)."""
    if settings.store_writers >= 0:
        return settings.store_writers
    return AUTO_STORE_WRITERS if resolve_decode_pool(settings.decode_pool, device_type) == "process" else 0


def resolve_shards_in_flight(settings: WorkerSettings, device_type: str) -> int:
    """How many shards one work unit labels at once: with decode processes, one per process and two more
    (a process never waits for its next shard while finished shards are being written); with decode
    threads, one (its threads already share the CPUs)."""
    if settings.shards_in_flight:
        return settings.shards_in_flight
    if resolve_decode_pool(settings.decode_pool, device_type) == "process":
        return resolve_decode_workers(settings.decode_workers) + 2
    return 1
