"""Data workers (decode processes, DataLoader workers) run at a lower priority than the process driving the
device (labeler/worker_priority.py), so its launching thread gets a core when every core is busy."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import IterableDataset

from labeler.decode_workers import DecodeWorkers
from labeler.worker_priority import WORKER_NICENESS
from trainer.shard_stream import _data_loader

REPO = Path(__file__).resolve().parents[1]


def expected_niceness() -> int:
    return min(19, os.nice(0) + WORKER_NICENESS)


def test_lower_worker_priority_raises_the_niceness_of_its_process():
    code = ("import os; from labeler.worker_priority import lower_worker_priority; "
            "before = os.nice(0); lower_worker_priority(); print(before, os.nice(0))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=60).stdout  # a child: this test process keeps its own priority
    before, after = map(int, out.split())
    assert after == min(19, before + WORKER_NICENESS)


class Niceness(IterableDataset):
    def __iter__(self):
        yield os.nice(0)


@pytest.mark.timeout(60)
def test_data_loader_workers_run_at_lower_priority():
    before = os.nice(0)
    loader = _data_loader(Niceness(), workers=1, pin_memory=False, prefetch_factor=1)
    assert list(loader) == [expected_niceness()]
    assert os.nice(0) == before  # the training process keeps its priority


@pytest.mark.timeout(60)
def test_decode_processes_run_at_lower_priority():
    workers = DecodeWorkers(1, "process")
    try:
        workers.wait_ready()
        assert os.getpriority(os.PRIO_PROCESS, workers._procs[0].pid) == expected_niceness()
    finally:
        workers.close()
