"""Where one thread's wall time goes, from samples of its Python stack: for the benches' host-bound loops.

A loop that feeds a GPU can be host-bound (the device waits while the loop issues work), and which of its
calls costs the time is in no kernel profile. A sampler thread reads the watched thread's current frame
every `interval` seconds (`sys._current_frames`) and counts, per sample, the innermost frame in this
repository's code and the call it was in (torch, numpy, queue, ...). That is a statistical profile of wall
time, waits for the GIL or a lock included, at far less cost than a tracing profiler. Only Python frames are
seen: time inside a C call counts on the Python line that made it.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from pathlib import Path
from types import FrameType

SAMPLE_INTERVAL_S = 0.005  # the benches' default: 200 samples a second
_ROOT = Path(__file__).resolve().parent.parent
_OWN_CODE = tuple(str(_ROOT / package) + os.sep for package in ("labeler", "trainer", "labelstore", "pipelines"))


class StackSampler:
    """Sample `thread` (default: the calling thread) every `interval` seconds between `start` and `stop`
    (or as a context manager); `top(n)` gives the n most frequent places with their share of the samples."""

    def __init__(self, thread: threading.Thread | None = None, interval: float = SAMPLE_INTERVAL_S):
        if not interval > 0:
            raise ValueError(f"StackSampler: interval must be > 0 seconds, got {interval}")
        ident = thread.ident if thread is not None else threading.get_ident()
        if ident is None:
            raise ValueError("StackSampler: the thread to sample has not started")
        self.ident, self.interval = ident, interval
        self.counts: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> "StackSampler":
        self._stop.clear()
        self._sampler = threading.Thread(target=self._run, name="stl-stack-sampler", daemon=True)
        self._sampler.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
            self._sampler = None

    def __enter__(self) -> "StackSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.ident)
            if frame is None:  # the thread has ended
                return
            self.counts[place(frame)] += 1
            self.samples += 1

    def top(self, n: int = 12) -> list[str]:
        """The n most sampled places, `  31.2 %  labeler/render_batch.py:312 render_batch → copy_ (torch)`."""
        total = max(self.samples, 1)
        return [f"{100 * count / total:6.1f} %  {where}" for where, count in self.counts.most_common(n)]


def place(frame: FrameType) -> str:
    """A sample's place: the innermost frame of this repository's code (file:line function) and, when the
    sample was deeper, the function it was in there (with its package)."""
    own = frame
    while own is not None and not own.f_code.co_filename.startswith(_OWN_CODE):
        own = own.f_back
    if own is None:
        return f"{_where(frame)} (no frame of this repository)"
    if own is frame:
        return _where(own)
    return f"{_where(own)} → {frame.f_code.co_name} ({_package(frame.f_code.co_filename)})"


def _where(frame: FrameType) -> str:
    path = frame.f_code.co_filename
    shown = os.path.relpath(path, _ROOT) if path.startswith(_OWN_CODE) else _package(path)
    return f"{shown}:{frame.f_lineno} {frame.f_code.co_name}"


def _package(path: str) -> str:
    """`torch/_dynamo/eval_frame.py` for a file under site-packages (or the stdlib), else the file name."""
    parts = Path(path).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return "/".join(parts[-2:])
