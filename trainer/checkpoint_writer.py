"""Checkpoints written in the background: the training loop pauses only to queue a copy of its state.

Serialising and fsyncing a checkpoint takes about half a second for FAN-S (model, EMA and AdamW state:
0.4 GB) on a CPU, more with the device-to-host copies torch.save makes of GPU tensors one by one, and the
loop writes one at every epoch end and every `run.checkpoint_every` updates. Written in the loop, that time
is lost to training each time: on short epochs (a small dataset, a bench) a large share of the run.
`CheckpointWriter.submit` takes a copy of the state at the checkpoint's moment (`host_copy`: GPU tensors
copied into page-locked memory without waiting, queued before any later step on the same stream; host
tensors cloned) and writes it with `atomic_save` on its own thread, once the device has made the copies.

At most one write is in flight: the next checkpoint first waits for the previous one, and `wait()` (the loop
calls it before it returns, whatever the reason) makes sure the last one is on disk. A failed write is
raised at the next checkpoint or at `wait()`, naming the file; the previous checkpoint stays intact
(`atomic_save`), as after a crash mid-write.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch

from labeler.device import is_dense, to_host_async
from trainer.checkpoint import atomic_save
from trainer.errors import TrainCheckpointError


def host_copy(obj: Any, devices: set | None = None) -> Any:
    """A copy of a checkpoint dict that later training cannot change: every dict, list and tuple rebuilt,
    tensors copied to the host (device tensors into page-locked memory without waiting; their devices are
    added to `devices`: wait for them before reading the copies); other values as they are.

    A checkpoint holds thousands of tensors (FAN-S with its EMA and AdamW state: about 2,000). Copied one by
    one, each is a page-locked allocation and a copy issued from Python, and the training loop waits for them
    all. Here the device tensors of each top-level entry of a dict (model, EMA, optimizer, ...) that share a
    device and dtype are copied into one page-locked buffer, as views of it, by one `torch._foreach_copy_`. A
    part saved alone later (`export_for_labeling` keeps only the weights) holds only its own buffers."""
    if isinstance(obj, dict):
        return {k: _copy_part(v, devices) for k, v in obj.items()}
    return _copy_part(obj, devices)


def _copy_part(obj: Any, devices: set | None) -> Any:
    tensors: dict[int, torch.Tensor] = {}
    _collect(obj, tensors)
    copies = _copy_tensors(list(tensors.values()), devices)
    return _rebuild(obj, copies)


def _collect(obj: Any, into: dict) -> None:
    if isinstance(obj, torch.Tensor):
        into.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, into)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, into)


def _rebuild(obj: Any, copies: dict) -> Any:
    if isinstance(obj, torch.Tensor):
        return copies[id(obj)]
    if isinstance(obj, dict):
        return {k: _rebuild(v, copies) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v, copies) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuild(v, copies) for v in obj)
    return obj


# Device tensors are copied into shared page-locked buffers, which torch's host allocator keeps and reuses from
# one checkpoint to the next. Host tensors are cloned one by one: a fresh buffer of hundreds of MB would be new
# pages on every checkpoint (4x slower than the clones, measured on a CPU).
GROUPED_DEVICES = ("cuda",)


@torch.no_grad()
def _copy_tensors(tensors: list[torch.Tensor], devices: set | None) -> dict[int, torch.Tensor]:
    """id(t) → t's host copy; dense tensors grouped by (device, dtype) into one buffer each."""
    copies: dict[int, torch.Tensor] = {}
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if devices is not None and t.device.type != "cpu":
            devices.add(t.device)
        if t.device.type in GROUPED_DEVICES and is_dense(t):
            groups.setdefault((t.device, t.dtype), []).append(t)
        else:  # a host tensor (cloned), or a strided view: copied on its own
            copies[id(t)] = to_host_async(t)
    for (device, dtype), group in groups.items():
        buffer = torch.empty(sum(t.numel() for t in group), dtype=dtype, pin_memory=device.type == "cuda")
        views, offset = [], 0
        for t in group:
            views.append(buffer.as_strided(t.size(), t.stride(), offset))
            offset += t.numel()
        # Queued on the current stream, as each copy_ would be: before any later step changes the tensors.
        torch._foreach_copy_(views, [t.detach() for t in group], non_blocking=device.type == "cuda")
        copies.update((id(t), v) for t, v in zip(group, views))
    return copies


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._path: Path | None = None
        # (time.perf_counter() at its start, seconds) of each background write: the time a second thread of the
        # training process was busy serialising (a bench reads it against its timed window)
        self.writes: list[tuple[float, float]] = []

    def submit(self, obj: Any, path: str | Path) -> None:
        """Write the state in `obj` as it is now to `path` atomically, in the background (the previous write
        is waited for first; training may change `obj`'s tensors as soon as this returns)."""
        self.wait()
        devices: set = set()
        copy = host_copy(obj, devices)
        ready = []
        for device in devices:  # the copies were queued on each device's current stream
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            ready.append(event)
        self._path = Path(path)
        self._thread = threading.Thread(target=self._write, args=(copy, self._path, ready), name="stl-checkpoint",
                                        daemon=False)  # not a daemon: an exiting interpreter finishes the file
        self._thread.start()

    def _write(self, obj: Any, path: Path, ready: list) -> None:
        start = time.perf_counter()
        try:
            for event in ready:
                event.synchronize()
            atomic_save(obj, path)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e
        finally:
            self.writes.append((start, time.perf_counter() - start))

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error, naming the file."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise TrainCheckpointError(f"writing checkpoint {self._path} failed: {type(error).__name__}: {error} "
                                       f"(the previous checkpoint there is intact)") from error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
