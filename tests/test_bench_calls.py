"""labeler.bench_calls.time_calls: host and wall milliseconds per call, every callable warmed up first."""
from __future__ import annotations

import time

import pytest
import torch

from trainer.bench_figures import describe_calls
from labeler.bench_calls import time_calls


def test_each_call_is_warmed_up_then_timed_per_call():
    counts = {"fast": 0, "slow": 0}

    def fast():
        counts["fast"] += 1

    def slow():
        counts["slow"] += 1
        time.sleep(0.01)

    timings = time_calls({"fast": fast, "slow": slow}, torch.device("cpu"), repeats=5, warmup=2)
    assert counts == {"fast": 7, "slow": 7}
    (fast_host, _), (slow_host, slow_wall) = timings["fast"], timings["slow"]
    assert slow_host >= 10 and slow_wall >= slow_host and fast_host < slow_host
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_calls({"fast": fast}, torch.device("cpu"), repeats=0)


def test_the_line_names_each_way():
    line = describe_calls("photometric ops alone", {"grouped by op": (9.1, 9.3), "one CUDA graph": (0.2, 1.1)}, 128)
    assert line == ("photometric ops alone, batch of 128: grouped by op host 9.10 ms, wall 9.30 ms; "
                    "one CUDA graph host 0.20 ms, wall 1.10 ms")
