"""labeler.parent_watch: the work unit's helper processes (a decode process blocked on its flow-control credit,
an idle store writer) end when the work unit's process is SIGKILLed, instead of waiting forever."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DECODE = """
from labeler.bench_shards import make_bench_shards
from labeler.decode_chunks import DecodeJob
from labeler.decode_workers import DecodeWorkers
from labeler.teacher_spec import build_labeler_spec
shards = make_bench_shards(sys.argv[1] + "/shards", shards=1, per_shard=12, min_size=40, max_size=90, num_classes=10)
spec = build_labeler_spec(name="t", model="fan_test_p4_hybrid_token", num_classes=10, views=3, topk=4)
job = DecodeJob(url=shards[0], num_samples=12, first_row=0, store_seed=3, store_path="s.zarr",
                view_spec=spec.view_spec, views=3, mode="pixels", chunk_images=1, threads=1, shared=True)
workers = DecodeWorkers(1, "process", max_chunks_ahead=1)
workers.wait_ready()
chunks = workers.submit(job)
next(chunks)  # the process decodes on and then waits for its next credit
pids = [p.pid for p in workers._procs]
"""

WRITER = """
from labeler.store_writers import StoreWriters
from labeler.teacher_spec import build_labeler_spec, open_labeler_store
spec = build_labeler_spec(name="t", model="fan_test_p4_hybrid_token", num_classes=10, views=2, topk=3)
store, lab = open_labeler_store(sys.argv[1] + "/l.zarr", seed=0, rows_per_chunk=8, spec=spec)
writers = StoreWriters(str(store.path), "t", 1, labels=lab)
writers.start()
pids = list(writers._pool._processes)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an init that reaps late must not fail the test)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("helpers", [DECODE, WRITER], ids=["decode-process", "store-writer"])
def test_helper_processes_end_with_a_killed_work_unit(helpers, tmp_path):
    script = tmp_path / "unit.py"
    body = "".join(f"    {line}\n" for line in helpers.strip().splitlines())
    script.write_text("import sys, time\nif __name__ == '__main__':\n" + body
                      + "    print(*pids, flush=True)\n    time.sleep(600)\n")
    unit = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pids = [int(p) for p in unit.stdout.readline().split()]
        assert pids and all(_running(p) for p in pids)
        unit.kill()
        unit.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.2)
        left = [p for p in pids if _running(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"helper processes {left} outlived their killed work unit"
    finally:
        unit.kill()
