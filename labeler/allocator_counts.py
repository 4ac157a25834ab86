"""The CUDA allocators' calls inside a window of a bench (`start()` … `delta()`), process-wide.

Device: new cudaMalloc segments, frees (a cudaFree waits for the whole device) and failed mallocs retried after
emptying the cache. Host: new page-locked blocks made by torch's caching host allocator and the time spent
making them. A page-locked allocation is slow (the pages are locked one by one) and is one of the calls the
CUDA programming guide lists as keeping two streams' work from running concurrently, so a loop that keeps
making fresh ones pays twice. In steady work all of these stay at 0; batches of ever-new shapes, or more
buffers alive at once than the caches hold, keep them climbing. None on a CPU.
"""
from __future__ import annotations

import torch

DEVICE_KEYS = (("num_device_alloc", "mallocs"), ("num_device_free", "frees"), ("num_alloc_retries", "retries"))
# torch reports the time of its host allocations in microseconds; older versions have no host statistics.
HOST_KEYS = (("num_host_alloc", "page-locked allocs"), ("host_alloc_time.total", "page-locked alloc us"))


def _host_stats() -> dict:
    stats = getattr(torch.cuda, "host_memory_stats", None)
    return stats() if stats is not None else {}


class AllocatorCounts:
    """The counts of the window from `start()` to `delta()`: a dict (mallocs, frees, retries and, where torch
    reports them, page-locked allocs and their microseconds), or None on a CPU."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._start: dict | None = None

    def _read(self) -> dict | None:
        if self.device.type != "cuda":
            return None
        stats = torch.cuda.memory_stats(self.device)
        counts = {name: int(stats.get(key, 0)) for key, name in DEVICE_KEYS}
        # Only the host statistics this torch reports: a missing key must not read as "0 allocations".
        host = _host_stats()
        counts.update({name: int(host[key]) for key, name in HOST_KEYS if key in host})
        return counts

    def start(self) -> None:
        self._start = self._read()

    def delta(self) -> dict | None:
        now = self._read()
        if now is None or self._start is None:
            return None
        return {k: now[k] - self._start.get(k, 0) for k in now}


def describe_allocator(counts: dict | None) -> str:
    """'3 mallocs 0 frees 0 retries' and, where torch reports them, '; 12 page-locked allocs in 40.1 ms'."""
    if counts is None:
        return ""
    text = " ".join(f"{counts[name]} {name}" for _, name in DEVICE_KEYS if name in counts)
    if "page-locked allocs" in counts:
        text += f"; {counts['page-locked allocs']} page-locked allocs"
        if "page-locked alloc us" in counts:
            text += f" in {counts['page-locked alloc us'] / 1e3:.1f} ms"
    return text
