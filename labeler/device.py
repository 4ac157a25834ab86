"""The one device resolver of the labeler and the trainer: a setting (`auto`, `cpu`, `cuda`, `cuda:N`) → torch.device;
the one way small host arrays go to the device inside a hot loop (`to_device`) and device results come back without
a wait (`to_host_async`); cuDNN's algorithm choice."""
from __future__ import annotations

import numpy as np
import torch

from labeler.errors import DeviceError


def resolve_device(spec: str | torch.device, local_rank: int = 0) -> torch.device:
    """`auto` → this process's GPU when torch sees one, else CPU; `cuda` → cuda:LOCAL_RANK (one GPU per rank)."""
    name = str(spec)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if not (name == "cpu" or name.startswith("cuda")):
        raise DeviceError(f"device must be auto, cpu or cuda[:N], got {spec!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for, but torch sees no CUDA device; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"device {spec!r}: {e}") from None


def prefer_fastest_convolutions(device: torch.device | str) -> None:
    """On CUDA, let cuDNN time its convolution algorithms for each new input shape and keep the fastest (timm's
    train script does the same). Our hot loops run fixed shapes (padded or drop-last batches), so each search is
    paid once. The chosen algorithm may differ between runs, as may the last bits of a result (not on CPU)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def to_device(host, device: torch.device | str) -> torch.Tensor:
    """A host array (numpy or CPU tensor) → `device`, never waiting on the device: on CUDA a copy from pageable
    memory first waits for the stream to drain (a host sync per call), so the bytes are page-locked first
    (torch's caching host allocator recycles the buffer once the copy has run)."""
    device = torch.device(device)
    if isinstance(host, np.ndarray) and not host.flags.writeable:
        # torch will not wrap a read-only array (Pillow's pixels are one) without a warning: copy it once,
        # straight into page-locked memory when it is bound for the GPU.
        dtype = torch.from_numpy(np.empty(0, host.dtype)).dtype
        t = torch.empty(host.shape, dtype=dtype, pin_memory=device.type == "cuda")
        t.numpy()[...] = host
    else:
        t = torch.as_tensor(host)
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def is_dense(t: torch.Tensor) -> bool:
    """Its elements fill exactly `numel` consecutive slots in some dimension order (contiguous or channels-last):
    a copy with the same strides, or a view of a flat buffer, can hold it."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t` that later device work cannot change: a device tensor copied into page-locked memory
    without waiting (queued on the current stream: wait for the device, e.g. an event recorded after it, before
    reading it), its strides kept; a host tensor cloned."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    out = (torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True) if is_dense(t)
           else torch.empty(t.size(), dtype=t.dtype, pin_memory=True))
    return out.copy_(t, non_blocking=True)
