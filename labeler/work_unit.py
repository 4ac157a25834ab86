"""The labeling work unit: one dataset shard → its rows of one labeler in the store, `done` last.

Each image is decoded once and all S views are rendered from it; a small thread pool decodes and
renders the next images while the teacher runs on the current batch (PIL and torch release the GIL),
so the device does not wait on the CPU. Results stay in memory until the shard is complete and are
written in one `write_shard` call: a worker killed mid-shard leaves nothing behind, and a retry
(same params from the same seeds, same teacher) writes the same rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from labeler.models import create_token_model
from labeler.device import resolve_device
from labeler.models.checkpoint import load_checkpoint
from labeler.render_torch import render_views
from labeler.teacher import Teacher
from labelstore import (NUM_PARAMS, EncodedLogits, ImageDecodeError, LabelStore, ShardCapacityError, ShardConflict,
                        decode_image, draw_views, render)
from labelstore.shard_format import ShardSample, image_fingerprint, iter_shard

PHASES = ("read", "decode", "render", "forward", "topk", "write")  # timed phases of the work unit
RENDER_BACKENDS = ("auto", "torch", "pillow")


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs the teacher; what it computes comes from the labeler's spec in the store."""

    checkpoint: str | None
    batch_size: int = 256  # views per forward pass
    amp: str = "bf16"
    compile: bool = False
    device: str = "auto"  # auto = cuda if available, else cpu
    render_backend: str = "auto"  # auto = torch on cuda, Pillow (the reference renderer) on cpu
    decode_threads: int = 2
    dump_views_dir: str | None = None  # debug hook: save every rendered view of a shard (tests)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.render_backend not in RENDER_BACKENDS:
            raise ValueError(f"render_backend must be one of {RENDER_BACKENDS}, got {self.render_backend!r}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {self.decode_threads}")


@dataclass(frozen=True)
class FaultInjection:
    """Test switch: kill this worker process (SIGKILL) once, after `kill_after` samples, unless `marker` exists."""

    kill_after: int
    marker: str

    @classmethod
    def from_env(cls) -> "FaultInjection | None":
        """`STL_FAULT_KILL_AFTER=<n samples>` and `STL_FAULT_MARKER=<file>` (the marker makes it fire once)."""
        after = os.environ.get("STL_FAULT_KILL_AFTER")
        if not after:
            return None
        marker = os.environ.get("STL_FAULT_MARKER")
        if not marker:
            raise ValueError("STL_FAULT_KILL_AFTER needs STL_FAULT_MARKER=<file> so the kill happens only once")
        return cls(int(after), marker)

    def tick(self, samples_done: int) -> None:
        if samples_done >= self.kill_after and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed pid {os.getpid()} after {samples_done} samples\n")
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ShardOutcome:
    """What happened to one shard (returned by workers, summarised by the job)."""

    shard_index: int
    url: str
    ok: bool
    num_samples: int = 0
    num_invalid: int = 0
    views: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    error: str | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)


class PhaseClock:
    """Busy seconds per phase; `sync` (bench only) waits for the device so time lands in the right phase."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds = {p: 0.0 for p in PHASES}
        self._sync = sync

    def timed(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        if self._sync is not None:
            self._sync()
        self.seconds[phase] += time.perf_counter() - start
        return out


@dataclass
class _Prepared:
    """One sample after decode + render (views None when the sample is invalid)."""

    sample: ShardSample
    image_hw: tuple[int, int]
    params: np.ndarray | None
    views: Any
    error: str | None


def ordered_prefetch(fn: Callable[[Any], Any], items: Iterable[Any], threads: int, depth: int) -> Iterator[Any]:
    """fn(item) for each item, in order, computed up to `depth` items ahead on a thread pool."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stl-decode")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ShardLabeler:
    """Callable work unit: `labeler(shard_index) -> ShardOutcome`. Holds the teacher; runs without Ray."""

    def __init__(self, store_path: str, labeler_name: str, settings: WorkerSettings,
                 fault: FaultInjection | None = None, teacher: Any = None, sync_timing: bool = False):
        self.settings = settings
        self.store = LabelStore.open(store_path, mode="r+")
        self.labels = self.store.labeler(labeler_name)
        self.spec = self.labels.spec
        self.device = resolve_device(settings.device)
        backend = settings.render_backend
        self.render_backend = ("torch" if self.device.type == "cuda" else "pillow") if backend == "auto" else backend
        self.teacher = teacher if teacher is not None else build_teacher(self.spec, settings, self.device)
        self.fault = fault
        self.samples_done = 0  # per process, across shards: what the fault switch counts
        sync = torch.cuda.synchronize if (sync_timing and self.device.type == "cuda") else None
        self.clock = PhaseClock(sync)

    # --- per sample (runs on the prefetch threads) ---------------------------------------------
    def _prepare(self, item: tuple[int, ShardSample], first_row: int, url: str) -> _Prepared:
        pos, sample = item
        if sample.error is not None:
            return _Prepared(sample, (0, 0), None, None, sample.error)
        try:
            image = self.clock.timed("decode", decode_image, sample.image, f"{url}:{sample.image_name}")
        except ImageDecodeError as e:
            return _Prepared(sample, (0, 0), None, None, str(e))
        hw = (image.height, image.width)
        params = draw_views(self.spec.view_spec, self.store.seed, first_row + pos, self.spec.views, hw)
        if self.render_backend == "torch":
            views = self.clock.timed("render", render_views, image, params, self.spec.view_spec, self.device)
        else:
            views = self.clock.timed("render", lambda: np.stack([render(image, p, self.spec.view_spec) for p in params]))
        return _Prepared(sample, hw, params, views, None)

    # --- per shard --------------------------------------------------------------------------------
    def __call__(self, shard_index: int, url: str | None = None) -> ShardOutcome:
        shard = self.store.shard(shard_index)
        if url:  # where the shard is now (the store knows shards by name; they may have moved since registration)
            shard = dataclasses.replace(shard, url=url)
        start = time.perf_counter()
        before = dict(self.clock.seconds)
        try:
            num_invalid, bytes_written = self._label(shard)
        except Exception as e:  # noqa: BLE001 - unreadable tar, store or device error: report it with the URL
            return ShardOutcome(shard_index, shard.url, ok=False, error=f"{type(e).__name__}: {e}",
                                seconds=time.perf_counter() - start)
        phases = {k: self.clock.seconds[k] - before[k] for k in PHASES}
        valid = shard.num_samples - num_invalid
        return ShardOutcome(shard_index, shard.url, ok=True, num_samples=shard.num_samples, num_invalid=num_invalid,
                            views=valid * self.spec.views, seconds=time.perf_counter() - start,
                            bytes_written=bytes_written, phase_seconds=phases)

    def _samples(self, shard) -> Iterator[tuple[int, ShardSample]]:
        """(position, sample) of every sample; stops at once if the shard outgrew its registered rows."""
        pos = -1
        reader = iter_shard(shard.url)
        while True:
            t0 = time.perf_counter()
            sample = next(reader, None)
            self.clock.seconds["read"] += time.perf_counter() - t0
            if sample is None:
                break
            pos += 1
            if pos >= shard.num_samples:  # before any compute: nothing of this shard gets written
                raise ShardCapacityError(
                    f"shard {shard.url} has more samples than the {shard.num_samples} rows registered for it in "
                    f"{self.store.path} (the file changed since it was registered): nothing was written; "
                    "restore the original file or label it into a new store")
            yield pos, sample
        if pos + 1 != shard.num_samples:
            raise ShardConflict(f"shard {shard.url} has {pos + 1} samples but {shard.num_samples} were registered "
                                f"in {self.store.path}: the file changed since it was registered")

    def _label(self, shard) -> tuple[int, int]:
        spec, n, s = self.spec, shard.num_samples, self.spec.views
        keys, labels = [""] * n, np.full(n, -1, np.int32)
        image_hw, valid = np.zeros((n, 2), np.int32), np.zeros(n, bool)
        fingerprints = np.zeros(n, np.uint64)  # of the encoded image bytes: inputs are checked against the store
        params = np.zeros((n, s, NUM_PARAMS), np.float32)
        out = _ResultBuffers(n, s, spec)
        errors: list[dict[str, str]] = []
        dump = [] if self.settings.dump_views_dir else None
        batch: list[tuple[int, Any]] = []  # (flat index row * S + view start, views of one image)

        def flush() -> None:
            if batch:
                self._run_teacher(batch, out)
                batch.clear()

        prepared = ordered_prefetch(lambda it: self._prepare(it, shard.first_row, shard.url), self._samples(shard),
                                    threads=self.settings.decode_threads, depth=4 * self.settings.decode_threads)
        pending_views, seen_keys = 0, set()
        with contextlib.closing(prepared):
            for pos, item in enumerate(prepared):
                key = item.sample.key
                if key in seen_keys:  # keep the first one joinable by `__key__`; this row stays invalid
                    key = f"{key}#duplicate-at-{pos}"
                seen_keys.add(key)
                keys[pos], labels[pos] = key, item.sample.label
                if item.sample.image is not None:
                    fingerprints[pos] = image_fingerprint(item.sample.image)
                if item.error is not None:
                    errors.append({"key": key, "reason": item.error})
                else:
                    valid[pos], image_hw[pos], params[pos] = True, item.image_hw, item.params
                    batch.append((pos * s, item.views))
                    pending_views += s
                    if dump is not None:
                        dump.append((pos, np.asarray(item.views.cpu() if hasattr(item.views, "cpu") else item.views)))
                    if pending_views >= self.settings.batch_size:
                        flush()
                        pending_views = 0
                self.samples_done += 1
                if self.fault is not None:
                    self.fault.tick(self.samples_done)
        flush()
        if dump is not None:
            self._dump(shard, dump, n)
        tokens, cls = out.encoded()
        t0 = time.perf_counter()
        self.labels.write_shard(shard.index, keys=keys, labels=labels, image_hw=image_hw, valid=valid, params=params,
                                tokens=tokens, cls=cls, errors=errors, fingerprints=fingerprints)
        self.clock.seconds["write"] += time.perf_counter() - t0
        return len(errors), out.nbytes + params.nbytes

    def _run_teacher(self, batch: list[tuple[int, Any]], out: "_ResultBuffers") -> None:
        views = torch.cat([torch.as_tensor(v) for _, v in batch]) if len(batch) > 1 else torch.as_tensor(batch[0][1])
        cls_logits, token_logits = self.clock.timed("forward", self.teacher.forward, views)
        tokens, cls = self.clock.timed("topk", lambda: (self.teacher.encode(token_logits), self.teacher.encode(cls_logits)))
        flat = np.concatenate([np.arange(start, start + len(v)) for start, v in batch])
        out.put(flat, tokens, cls)

    def _dump(self, shard, dump: list[tuple[int, np.ndarray]], n: int) -> None:
        h, w = self.spec.input_size
        views = np.zeros((n, self.spec.views, h, w, 3), np.uint8)
        for pos, v in dump:
            views[pos] = v
        path = Path(self.settings.dump_views_dir) / f"shard-{shard.index:06d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, views)


class _ResultBuffers:
    """Encoded teacher outputs of a whole shard, filled batch by batch at flat (row * S + view) positions."""

    def __init__(self, n: int, s: int, spec: Any):
        self.n, self.s, self.dense = n, s, spec.topk == 0
        t, width = spec.num_tokens, (spec.num_classes if spec.topk == 0 else spec.topk)
        self.tok_logit = np.zeros((n * s, t, width), np.float16)
        self.cls_logit = np.zeros((n * s, width), np.float16)
        if not self.dense:
            # Invalid rows keep valid-looking fills (class ids 0..K-1, tail -inf): the store marks them invalid.
            ids = np.arange(spec.topk, dtype=spec.class_dtype)
            self.tok_cls = np.broadcast_to(ids, (n * s, t, spec.topk)).copy()
            self.cls_cls = np.broadcast_to(ids, (n * s, spec.topk)).copy()
            self.tok_tail = np.full((n * s, t), -np.inf, np.float16)
            self.cls_tail = np.full((n * s,), -np.inf, np.float16)

    def put(self, flat: np.ndarray, tokens: Any, cls: Any) -> None:
        self.tok_logit[flat], self.cls_logit[flat] = tokens.logit, cls.logit
        if not self.dense:
            self.tok_cls[flat], self.tok_tail[flat] = tokens.cls, tokens.tail_lse
            self.cls_cls[flat], self.cls_tail[flat] = cls.cls, cls.tail_lse

    @property
    def nbytes(self) -> int:
        arrays = [self.tok_logit, self.cls_logit] + ([] if self.dense else [self.tok_cls, self.cls_cls, self.tok_tail, self.cls_tail])
        return int(sum(a.nbytes for a in arrays))

    def encoded(self) -> tuple[Any, Any]:
        n, s = self.n, self.s
        shape = lambda a: a.reshape(n, s, *a.shape[1:])  # noqa: E731
        if self.dense:
            return EncodedLogits(shape(self.tok_logit)), EncodedLogits(shape(self.cls_logit))
        return (EncodedLogits(shape(self.tok_logit), shape(self.tok_cls), shape(self.tok_tail)),
                EncodedLogits(shape(self.cls_logit), shape(self.cls_cls), shape(self.cls_tail)))


def build_teacher(spec: Any, settings: WorkerSettings, device: Any):
    """The labeler's model (arch and classes from the spec) with its checkpoint, wrapped as a Teacher."""
    model = create_token_model(spec.arch, num_classes=spec.num_classes, pretrained=False, drop_path_rate=0.0)
    if settings.checkpoint:
        sha = load_checkpoint(model, settings.checkpoint, prefer_ema=True)
        if spec.checkpoint_sha256 and sha != spec.checkpoint_sha256:
            raise ValueError(f"checkpoint {settings.checkpoint} has sha256 {sha[:12]}…, but labeler {spec.name!r} "
                             f"in the store was made with {spec.checkpoint_sha256[:12]}…")
    return Teacher(model, spec.mean, spec.std, spec.topk, device=device, amp=settings.amp, compile=settings.compile)
