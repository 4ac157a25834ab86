"""labeler.stage_clock: host phases, device phases and the host's time to issue them (CPU: the same time)."""
from __future__ import annotations

import time

import pytest
import torch

from labeler.stage_clock import DEVICE_PHASES, PHASES, StageClock


def test_phases_add_up_and_device_phases_record_their_issue_time_on_cpu():
    clock = StageClock(torch.device("cpu"))
    with clock.host("write"):
        time.sleep(0.02)
    with clock.device("render"):
        time.sleep(0.03)
    clock.add("decode", 1.5)
    assert set(clock.seconds) == set(PHASES) and set(clock.issue_seconds) == set(DEVICE_PHASES)
    assert clock.seconds["write"] >= 0.02 and clock.seconds["decode"] == 1.5
    assert clock.seconds["render"] >= 0.03 and clock.issue_seconds["render"] == clock.seconds["render"]
    assert clock.issue_seconds["forward"] == 0.0 and clock.resolve()["render"] == clock.seconds["render"]
    longest = clock.issue_max["render"]
    assert longest == clock.issue_seconds["render"]
    with clock.device("render"):  # a shorter batch: the longest stays
        pass
    assert clock.issue_max["render"] == longest and clock.issue_seconds["render"] > longest
    clock.reset_span()  # a bench's timed run starts: its own longest batches
    assert clock.issue_max == {p: 0.0 for p in DEVICE_PHASES}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_device_time_comes_from_events_and_issue_time_from_the_host():
    clock = StageClock(torch.device("cuda"))
    x = torch.randn(2048, 2048, device="cuda")
    with clock.device("forward"):
        for _ in range(20):
            x = x @ x / 2048
    issued = clock.issue_seconds["forward"]
    seconds = clock.resolve()["forward"]
    assert seconds > 0 and issued > 0 and not clock._events


def test_loop_work_separates_the_threads_cpu_time_from_its_wall_time_and_marks_the_batch_span():
    clock = StageClock(torch.device("cpu"))
    with clock.loop_work():
        time.sleep(0.05)  # not running: wall, no CPU (as a wait for the GIL)
    slept = clock.loop
    assert slept.wall >= 0.05 and slept.cpu < 0.02 and slept.not_running >= 0.03
    if slept.run_queue is not None:  # asleep, not waiting for a core (this thread was not runnable)
        assert slept.asleep >= 0.03
    with clock.loop_work():
        end = time.thread_time() + 0.03
        while time.thread_time() < end:  # running: CPU and wall alike
            pass
    ran = clock.loop.since(slept)
    assert ran.cpu >= 0.03 and ran.wall >= ran.cpu - 1e-3
    assert clock.first_launch is None and clock.last_filed is None
    clock.batch_launched()
    first = clock.first_launch
    clock.batch_launched()  # only the first launch counts
    clock.batch_filed()
    assert clock.first_launch == first and clock.last_filed >= first
    clock.reset_span()
    assert clock.first_launch is None and clock.last_filed is None
