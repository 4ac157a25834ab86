"""labeler.thread_clock: a thread's wall time split into running, waiting for a free core and asleep."""
from __future__ import annotations

import threading
import time

import pytest

import labeler.thread_clock as thread_clock
from labeler.thread_clock import ThreadTimes, describe_not_running, thread_times


def test_a_sleeping_thread_is_asleep_and_a_busy_one_runs():
    start = thread_times()
    time.sleep(0.05)
    slept = thread_times().since(start)
    assert slept.wall >= 0.05 and slept.cpu < 0.02 and slept.not_running >= 0.03
    if slept.run_queue is not None:  # asleep: not runnable, so not waiting for a core either
        assert slept.asleep >= 0.03 and slept.run_queue < 0.02
    start = thread_times()
    end = time.thread_time() + 0.05
    while time.thread_time() < end:
        pass
    ran = thread_times().since(start)
    assert ran.cpu >= 0.05 and ran.wall >= ran.cpu - 1e-3


@pytest.mark.timeout(30)
def test_a_thread_that_waits_for_the_gil_is_not_running_and_the_other_threads_cpu_is_counted():
    """Two Python threads busy at once take turns on the GIL: the measured one runs about half its wall, and the
    other thread's CPU shows up as the process's other threads."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    other = threading.Thread(target=spin, daemon=True)
    other.start()
    try:
        start = thread_times()
        end = time.perf_counter() + 0.4
        while time.perf_counter() < end:
            sum(range(1000))
        took = thread_times().since(start)
    finally:
        stop.set()
        other.join()
    assert took.not_running >= 0.1 * took.wall, took
    assert took.other_threads_cpu >= 0.05, took
    if took.run_queue is not None:
        assert took.asleep > 0, took  # the GIL: asleep on its condition, not in the run queue


def test_without_scheduler_statistics_only_not_running_is_said(monkeypatch, tmp_path):
    monkeypatch.setattr(thread_clock, "SCHEDSTAT", str(tmp_path / "missing"))
    start = thread_times()
    time.sleep(0.01)
    took = thread_times().since(start)
    assert took.run_queue is None and took.asleep is None and took.not_running >= 0.005
    assert describe_not_running(ThreadTimes(0.07, 0.05, None, 0.1), 1e3).endswith(
        "20.0 ms not running (the GIL held by another thread, or no free core; this kernel keeps no run-queue figures)")


def test_sums_differences_and_scaling():
    a, b = ThreadTimes(1.0, 0.5, 0.1, 2.0), ThreadTimes(3.0, 1.0, 0.2, 5.0)
    assert b.since(a) == ThreadTimes(2.0, 0.5, pytest.approx(0.1), 3.0)
    assert (a + b).wall == 4.0 and (a + b).run_queue == pytest.approx(0.3)
    assert (a + ThreadTimes(1.0, 1.0, None, 1.0)).run_queue is None  # unknown stays unknown
    per_step = b.since(a).scaled(1e3 / 10)  # ms per step over 10 steps
    assert (per_step.wall, per_step.cpu, per_step.process_cpu) == pytest.approx((200.0, 50.0, 300.0))
    assert per_step.not_running == pytest.approx(150.0) and per_step.asleep == pytest.approx(140.0)
    assert per_step.other_threads_cpu == pytest.approx(250.0)
    assert describe_not_running(per_step, 1.0) == ("150.0 ms not running: 10.0 ms waiting for a free core, 140.0 ms "
                                                   "asleep (the GIL held by another thread of the process, or a lock, "
                                                   "queue or sync)")
