"""Timing device work for the benches (labeling, depthwise, student): host and wall time per call.

On a GPU a call returns once its kernels are queued: the host time says what a loop pays to issue it, the
wall time of back-to-back calls (device included) what it costs when the host keeps up."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls: dict[str, Callable[[], object]], device: torch.device, repeats: int = 20,
               warmup: int = 3) -> dict[str, tuple[float, float]]:
    """name → (host ms per call, wall ms per call); each callable is warmed up (captures, compiles) first."""
    if repeats < 1:
        raise ValueError(f"time_calls: repeats must be >= 1, got {repeats}")
    out = {}
    for name, fn in calls.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        issued = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        out[name] = (1e3 * (issued - start) / repeats, 1e3 * (done - start) / repeats)
    return out
