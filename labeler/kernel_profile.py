"""Which kernels a piece of device work spends its time in: torch.profiler's table, for the benches.

A bench's rates say how fast; this says where the device time goes (the model's kernels, the data path's,
the top-k), which is what says what to make faster. `stl-train bench --profile-steps` and `stl-labels bench
generate --profile-batches` print it.
"""
from __future__ import annotations

from typing import Callable

import torch

PROFILE_ROWS = 15


def profile_calls(call: Callable[[int], object], calls: int, device: torch.device | str) -> str:
    """torch.profiler's table of `calls` calls `call(i)`: the top `PROFILE_ROWS` kernels by self time on the
    device (a GPU), or ops by self CPU time (a CPU)."""
    cuda = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(calls):
            call(i)
        if cuda:
            torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=PROFILE_ROWS)
