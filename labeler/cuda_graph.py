"""One fixed-shape device function captured as a CUDA graph: each call is one graph launch.

A compiled FAN forward is still hundreds of kernels, each launched from Python. In the labeling work unit the
thread that launches them shares the GIL and the CPUs with the shard writers and the decode pipes, so the
device waited on launches (the forward took twice its bare time inside the pipeline). A replayed graph issues
the whole forward, top-k included, with one launch, whatever the host is doing. torch's `CUDAGraph` does the
capture; what we add is the fixed-shape contract (the work unit pads its last batch) and the warm-up before
the capture (compilation, cuDNN's algorithm search and the allocator must not happen inside it).
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from labeler.device import to_device

WARMUP_CALLS = 2  # the first call compiles (and cuDNN times its algorithms); the second runs what is captured


class GraphedFunction:
    """`fn(*xs) -> tuple of tensors` for one set of input shapes, dtypes and one CUDA device, captured on its
    first call.

    The outputs live in the graph's own memory and are overwritten by the next call: use them (or queue a copy
    of them) on the same stream before calling again, as the work unit does with its top-k copies. A call with
    another shape, dtype or device is an error naming both shapes (the capture is for one shape only). If the
    capture itself fails (a function that syncs with the host cannot be captured), a warning says so and every
    call runs `fn` directly: slower, same results. Inputs after the first may live on the host (small per-call
    arguments): the call copies them, page-locked, into the graph's device inputs, the one upload they need.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]]):
        self.fn = fn
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._lock = threading.Lock()  # one capture, and no replay racing another caller's input copy
        self.failed: str | None = None  # why the capture failed (calls then run fn directly)

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not xs or xs[0].device.type != "cuda":
            raise ValueError(f"GraphedFunction needs a CUDA tensor, got one on {xs[0].device if xs else 'nothing'}"
                             f" (its first input says where the graph runs)")
        device = xs[0].device
        with self._lock:
            if self.failed is not None:
                return tuple(self.fn(*(_on(device, x) for x in xs)))
            if self._graph is None:
                try:
                    self._capture(xs, device)
                except RuntimeError as e:
                    self.failed = f"{type(e).__name__}: {e}"
                    warnings.warn(f"CUDA graph capture failed, running without a graph: {self.failed}", stacklevel=2)
                    return tuple(self.fn(*(_on(device, x) for x in xs)))
            if len(xs) != len(self._inputs) or any(
                    x.shape != s.shape or x.dtype != s.dtype for x, s in zip(xs, self._inputs)) \
                    or device != self._inputs[0].device:
                raise ValueError(f"the CUDA graph was captured for {_shapes(self._inputs)} on "
                                 f"{self._inputs[0].device}, got {_shapes(xs)} on {device}; keep one batch "
                                 f"shape (pad the last batch) or turn cuda_graph off")
            for static, x in zip(self._inputs, xs):
                # From pageable memory a copy first waits for the stream to drain: page-lock host inputs
                # (torch's host allocator recycles the buffer once the copy has run).
                static.copy_(x if x.is_cuda or x.is_pinned() else x.pin_memory(), non_blocking=True)
            self._graph.replay()
            return self._outputs

    def _capture(self, xs: tuple[torch.Tensor, ...], device: torch.device) -> None:
        self._inputs = tuple(x.to(device, copy=True) for x in xs)
        side = torch.cuda.Stream(device)  # warm-up off the caller's stream, as torch's capture recipe asks
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(*self._inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        caller = torch.cuda.current_stream(device)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls other threads of the process make meanwhile (pinned buffers, copies) are
            # not part of this capture and do not break it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.fn(*self._inputs)
        except RuntimeError:
            torch.cuda.set_stream(caller)  # torch's capture stream can stay current after a failure
            end_failed_capture(device)
            raise
        self._outputs = tuple(outputs)
        self._graph = graph


def _on(device: torch.device, x: torch.Tensor) -> torch.Tensor:
    return x if x.device == device else to_device(x, device)  # host inputs page-locked: no wait on the stream


def _shapes(xs) -> str:
    return ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in xs)


def end_failed_capture(device: torch.device) -> None:
    """Leave the device's random generator usable after a capture that failed.

    A capture marks the device's default generator as capturing and only a capture that ends cleanly unmarks
    it; after a failed one every later random op on the device (dropout, `randn`, a Gumbel draw) raises
    "Offset increment outside graph capture". One clean capture of a one-element add unmarks it."""
    scratch = torch.zeros(1, device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        scratch.add_(1)
