"""labeler.stack_sampler: a thread's wall time by place, from samples of its Python stack."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from labeler.stack_sampler import StackSampler, place
from trainer.step_timing import HostTimer


def busy(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def test_samples_name_the_repository_line_and_the_call_below_it():
    stop = threading.Event()
    timed_busy = HostTimer().wrap(busy)  # a frame of this repository (trainer/step_timing.py) above a test's
    worker = threading.Thread(target=timed_busy, args=(stop,))
    worker.start()
    try:
        with StackSampler(worker, interval=0.002) as sampler:
            time.sleep(0.3)
    finally:
        stop.set()
        worker.join()
    assert sampler.samples >= 20
    where, share = sampler.counts.most_common(1)[0][0], sampler.counts.most_common(1)[0][1] / sampler.samples
    assert where.startswith("trainer/step_timing.py:") and where.endswith("→ busy (tests/test_stack_sampler.py)")
    assert share > 0.9
    top = sampler.top(3)
    assert top[0].split("%")[0].strip().replace(".", "").isdigit() and "trainer/step_timing.py" in top[0]


def test_a_thread_outside_the_repository_and_one_that_ends():
    assert place(sys._getframe()).endswith("test_a_thread_outside_the_repository_and_one_that_ends (no frame of "
                                           "this repository)")
    worker = threading.Thread(target=time.sleep, args=(0.05,))
    worker.start()
    sampler = StackSampler(worker, interval=0.01).start()
    worker.join()
    time.sleep(0.05)
    taken = sampler.samples
    time.sleep(0.05)
    assert sampler.samples == taken  # the sampler stopped with the thread
    sampler.stop()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="interval must be > 0"):
        StackSampler(interval=0)
    with pytest.raises(ValueError, match="has not started"):
        StackSampler(threading.Thread(target=lambda: None))
