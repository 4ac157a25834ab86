"""Data workers yield the CPU to the process that drives the GPU.

The process driving the device launches kernels from one Python thread; when data workers (decode processes,
DataLoader workers) keep every core busy, that thread waits for a core and the device waits for its launches.
A niceness of 5 gives each worker about a third of the scheduler weight of the driving thread, so the workers
still use every core the driver leaves idle (their throughput is unchanged when the CPUs are not contended).
"""
from __future__ import annotations

import os

WORKER_NICENESS = 5


def lower_worker_priority(niceness: int = WORKER_NICENESS) -> None:
    """Raise this process's niceness by `niceness` (always allowed to an unprivileged process); a no-op where the
    platform has no `os.nice`."""
    nice = getattr(os, "nice", None)
    if nice is not None and niceness > 0:
        nice(niceness)
