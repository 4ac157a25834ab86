"""trainer.step_timing: host time of wrapped calls and the device's lag behind the host (the lag needs CUDA:
docker/bench-gpu.sh runs that test on a GPU node)."""
import time

import pytest
import torch

from labeler.allocator_counts import AllocatorCounts, describe_allocator
from trainer.step_timing import DeviceLag, HostTimer, describe_lag


def test_host_timer_sums_the_wrapped_calls_and_resets():
    timer = HostTimer()
    nap = timer.wrap(lambda s: time.sleep(s) or s)
    assert nap(0.02) == 0.02 and nap(0.01) == 0.01
    assert timer.calls == 2 and 0.03 <= timer.seconds < 0.5
    timer.reset()
    assert (timer.calls, timer.seconds) == (0, 0.0)


def test_host_timer_counts_a_call_that_raises():
    timer = HostTimer()

    def fail():
        time.sleep(0.01)
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        timer.wrap(fail)()
    assert timer.calls == 1 and timer.seconds >= 0.01


def test_device_lag_is_not_measured_on_a_cpu():
    lag = DeviceLag("cpu")
    lag.mark()
    lag.mark()
    assert lag.mean is None and describe_lag(lag.mean) == "n/a (CPU)"


def test_describe_lag_names_the_limit():
    assert describe_lag(0.03) == "0.03 (host-bound)"
    assert describe_lag(1.0) == "1.00 (device-bound)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_lag_sees_a_queued_device_and_an_idle_one():
    a = torch.randn(4096, 4096, device="cuda")
    lag = DeviceLag("cuda")
    for _ in range(5):  # the host queues seconds of matmuls far faster than the device runs them
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        lag.mark()
    assert lag.mean >= 1.0
    torch.cuda.synchronize()
    lag.reset()
    for _ in range(5):  # each step's work is done before the next begins: the device waits for the host
        a.add_(1)
        torch.cuda.synchronize()
        lag.mark()
    assert lag.mean == 0.0


def test_allocator_counts_are_none_on_a_cpu():
    counts = AllocatorCounts("cpu")
    counts.start()
    assert counts.delta() is None and describe_allocator(None) == ""


def test_allocator_counts_read_both_allocators_statistics(monkeypatch):
    """The keys torch reports (device: memory_stats, host: host_memory_stats, times in µs) become the window's
    counts, and the description says them in ms."""
    device_stats = {"num_device_alloc": 5, "num_device_free": 1, "num_alloc_retries": 0, "allocated_bytes.all.current": 9}
    host_stats = {"num_host_alloc": 2, "host_alloc_time.total": 1500, "host_alloc_time.max": 1000}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: dict(device_stats))
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: dict(host_stats))
    counts = AllocatorCounts("cuda")
    counts.start()
    device_stats.update(num_device_alloc=8, num_alloc_retries=1)
    host_stats.update({"num_host_alloc": 14, "host_alloc_time.total": 43_700})
    delta = counts.delta()
    assert delta == {"mallocs": 3, "frees": 0, "retries": 1, "page-locked allocs": 12, "page-locked alloc us": 42_200}
    assert describe_allocator(delta) == "3 mallocs 0 frees 1 retries; 12 page-locked allocs in 42.2 ms"
    del host_stats["host_alloc_time.total"]  # a torch without the time: the count alone, no "0.0 ms"
    counts.start()
    assert describe_allocator(counts.delta()) == "0 mallocs 0 frees 0 retries; 0 page-locked allocs"
    monkeypatch.delattr(torch.cuda, "host_memory_stats")  # an older torch: the device's counts only
    counts.start()
    assert describe_allocator(counts.delta()) == "0 mallocs 0 frees 0 retries"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_allocator_counts_see_a_new_segment():
    counts = AllocatorCounts("cuda")
    counts.start()
    x = torch.empty(3 * 2**30 // 4 + 12345, device="cuda")  # a size no cached block holds: a new cudaMalloc
    delta = counts.delta()
    del x
    assert delta["mallocs"] >= 1 and set(delta) >= {"mallocs", "frees", "retries"}
    assert describe_allocator(delta).startswith(f"{delta['mallocs']} mallocs")



def test_step_window_counts_only_its_own_targets_calls_and_syncs_at_close():
    from trainer.step_timing import StepWindow

    window = StepWindow("cpu")
    nap = window.targets.wrap(lambda: time.sleep(0.01))
    nap()  # before the window: not counted
    window.open()
    nap()
    window.mark()
    nap()
    synced = []
    window.close(lambda: synced.append(True))
    nap()  # after the window: not counted
    assert synced == [True] and 0.02 <= window.targets_s < 0.03 + 0.5
    assert window.device_lag is None and window.allocator is None  # CPU: no queue, no CUDA allocator
