"""The one device resolver of the labeler and the trainer: a setting (`auto`, `cpu`, `cuda`, `cuda:N`) → torch.device."""
from __future__ import annotations

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
