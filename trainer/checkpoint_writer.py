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
from pathlib import Path
from typing import Any

import torch

from labeler.device import to_host_async
from trainer.checkpoint import atomic_save
from trainer.errors import TrainCheckpointError


def host_copy(obj: Any, devices: set | None = None) -> Any:
    """A copy of a checkpoint dict that later training cannot change: every dict, list and tuple rebuilt,
    host tensors cloned, device tensors copied into page-locked host memory without waiting (their devices are
    added to `devices`: wait for them before reading the copies); other values as they are."""
    if isinstance(obj, torch.Tensor):
        if devices is not None and obj.device.type != "cpu":
            devices.add(obj.device)
        return to_host_async(obj)
    if isinstance(obj, dict):
        return {k: host_copy(v, devices) for k, v in obj.items()}
    if isinstance(obj, list):
        return [host_copy(v, devices) for v in obj]
    if isinstance(obj, tuple):
        return tuple(host_copy(v, devices) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._path: Path | None = None

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
        try:
            for event in ready:
                event.synchronize()
            atomic_save(obj, path)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

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
