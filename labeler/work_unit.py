"""The labeling work unit: dataset shards → their rows of one labeler in the store, `done` last.

Three kinds of threads and processes overlap so the device never waits (docs/design.md, "The labeling
work unit"):

1. decode workers (`labeler.decode_workers`: processes on a GPU node, threads on CPU) each take a whole
   shard, read its tar, decode each image once, draw its S view params and send the rows back in chunks
   (`labeler.decode_chunks`) — the images' own bytes, in shared memory;
2. one device loop (a thread) takes images from every shard in flight, fills fixed-shape forward batches
   of `batch_size // S` images (a shard's tail shares a batch with the next shard's head), copies each
   batch up and renders all its views in one `render_batch` call on a side stream (straight from the
   chunks, which their shard threads page-lock on arrival), runs the teacher and the top-k + tail on the
   compute stream, overlapping the next batch's copy and render,
   and copies the results back behind an event, filing a batch's results while the next two run;
3. each shard's caller (one thread per shard in flight: `label_shards` here, a threaded Ray actor in a
   job) files its rows and, once its last image's results are back, writes the shard in one
   `write_shard` call, while the device goes on with the other shards; on a GPU node the call runs in a
   store writer process (`labeler.store_writers`), so the device loop keeps the GIL.

A batch that cannot be filled (the last images) is padded to the full batch (its padding views are
dropped), so a compiled teacher sees one shape. Results stay in memory until their shard is complete:
a worker killed mid-shard leaves nothing behind, and a retry (same params from the same seeds, same
teacher) writes the same rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from labeler.decode_chunks import DecodedChunk, DecodeJob
from labeler.decode_workers import DecodeFailed, DecodeWorkers, resolve_decode_pool, resolve_decode_workers
from labeler.device import resolve_device
from labeler.device_jpeg import chunk_images, decode_on_device
from labeler.fault_injection import FaultInjection
from labeler.flat_images import FlatImages, upload_flat
from labeler.models import create_token_model
from labeler.models.checkpoint import load_checkpoint
from labeler.render_batch import SourceBatch, render_batch, warm_up_render
from labeler.shard_outcome import ShardOutcome
from labeler.shard_results import ResultBuffers, ShardRows
from labeler.stage_clock import StageClock
from labeler.store_writers import StoreWriters
from labeler.teacher import HostCopy, Teacher
from labeler.worker_settings import WorkerSettings, resolve_shards_in_flight, resolve_store_writers
from labelstore import EncodedLogits, LabelStore

__all__ = ["ShardLabeler", "build_teacher"]


class _ShardRun:
    """One shard being labelled: its rows (filed by its caller), its results (filed by the device loop)."""

    def __init__(self, shard: Any, spec: Any, dump: bool):
        self.shard = shard
        self.rows = ShardRows(shard.num_samples, spec.views)
        self.out = ResultBuffers(shard.num_samples, spec.views, spec)
        self.dump: dict[int, np.ndarray] | None = {} if dump else None
        self.outstanding = 0  # valid images handed to the device loop whose results are not back yet
        self.decode_ended = False
        self.error: str | None = None
        self.late_errors: list[tuple[int, str]] = []
        self.done = threading.Event()

    def fail(self, error: str) -> None:
        self.error = self.error or error
        self.done.set()

    def invalidate(self, pos: int, reason: str) -> None:
        """A row found undecodable on the device (after its caller filed it as valid): filed before the write."""
        self.late_errors.append((pos, reason))

    def check_done(self) -> None:
        if self.decode_ended and self.outstanding == 0:
            self.done.set()


@dataclass
class _Piece:
    """Valid images a..b-1 (in the chunk's valid-row order) of one chunk, placed in a forward batch."""

    run: _ShardRun
    chunk: DecodedChunk
    a: int
    b: int

    @property
    def positions(self) -> np.ndarray:
        return self.chunk.valid_positions[self.a:self.b]


@dataclass
class _InFlight:
    pieces: list[_Piece]
    tokens: HostCopy
    cls: HostCopy


_END = "end"
# Batches the device loop keeps queued on the device while it waits for and files the oldest one. With two, a
# pause of the loop's thread (the GIL, a garbage collection, a burst of arriving chunks) of up to a batch's
# device time leaves the device busy; with one, the device idled through any pause.
BATCHES_QUEUED = 2


class ShardLabeler:
    """The work unit: label shards into the store. Loads the teacher once; `__call__(shard)` labels one shard
    (thread-safe: concurrent calls share the device), `label_shards` many with several in flight."""

    def __init__(self, store_path: str, labeler_name: str, settings: WorkerSettings, teacher: Teacher | None = None,
                 fault: FaultInjection | None = None):
        self.settings = settings
        self.store = LabelStore.open(store_path, mode="r+")
        self.labels = self.store.labeler(labeler_name)
        self.spec = self.labels.spec
        self.device = resolve_device(settings.device)
        backend = settings.render_backend
        self.render_backend = ("torch" if self.device.type == "cuda" else "pillow") if backend == "auto" else backend
        if settings.decode_device == "cuda" and (self.device.type != "cuda" or self.render_backend != "torch"):
            raise ValueError("decode_device 'cuda' needs device cuda and the torch render backend")
        self.decode_workers = resolve_decode_workers(settings.decode_workers)
        self.decode_pool = resolve_decode_pool(settings.decode_pool, self.device.type)
        self.shards_in_flight = resolve_shards_in_flight(settings, self.device.type)
        self.writers = StoreWriters(str(self.store.path), labeler_name, resolve_store_writers(settings, self.device.type),
                                    labels=self.labels)
        self.images_per_batch = max(1, settings.batch_size // self.spec.views)
        self.teacher = teacher if teacher is not None else build_teacher(self.spec, settings, self.device)
        self.fault = fault
        self.samples_done = 0  # per process, across shards: what the fault switch counts
        self.batches = 0  # forward batches launched (the bench's per-batch figures)
        self.clock = StageClock(self.device)
        # Copies and renders (on a GPU): the compute stream runs only the teacher, overlapping the next batch's.
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._lock = threading.Lock()
        self._decoder: DecodeWorkers | None = None
        self._inbox: queue.Queue = queue.Queue(maxsize=4 * max(1, self.shards_in_flight))
        self._loop: threading.Thread | None = None
        self._active = 0  # shards being labelled now (calls in progress)
        self._loop_error: str | None = None
        self._ready = threading.Event()  # set by the device loop once warmed up (`start(wait=True)` waits)

    @property
    def views_per_batch(self) -> int:
        """The one forward shape: whole images of S views each (the last batch is padded to it)."""
        return self.images_per_batch * self.spec.views

    @property
    def chunk_mode(self) -> str:
        if self.render_backend == "pillow":
            return "views"
        return "jpeg" if self.settings.decode_device == "cuda" else "pixels"

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self, wait: bool = False) -> DecodeWorkers:
        """Start the decode workers and the device loop (the first shard does it otherwise); `wait` until
        every decode process is ready. Returns the decode workers."""
        with self._lock:
            if self._decoder is None:
                self._decoder = DecodeWorkers(self.decode_workers, self.decode_pool)
            if self._loop is None or not self._loop.is_alive():
                self._ready = threading.Event()
                self._loop = threading.Thread(target=self._device_loop, name="stl-device-loop", daemon=True)
                self._loop.start()
            decoder, ready = self._decoder, self._ready
        if wait:
            decoder.wait_ready()
            self.writers.start()
            ready.wait()  # the device loop's warm-up (the compiled render) is done
            if self._loop_error is not None:
                raise RuntimeError(f"the work unit's device loop stopped: {self._loop_error}")
        return decoder

    @property
    def device_loop_thread(self) -> threading.Thread:
        """The thread that issues every batch's device work (started by `start`; a bench samples its stack)."""
        if self._loop is None:
            raise RuntimeError("the work unit's device loop has not started: call start() first")
        return self._loop

    def close(self) -> None:
        """Stop the device loop and the decode workers (they are started again by the next call)."""
        with self._lock:
            loop, decoder = self._loop, self._decoder
            self._loop, self._decoder = None, None
        if loop is not None:
            self._inbox.put(None)
            loop.join()
        if decoder is not None:
            decoder.close()
        self.writers.close()

    def __enter__(self) -> "ShardLabeler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- per shard (caller threads) -----------------------------------------------------------------------
    def label_shards(self, shard_indices: Sequence[int], urls: Sequence[str | None] | None = None) -> Iterator[ShardOutcome]:
        """Label shards with `shards_in_flight` of them at once; outcomes in the order given."""
        urls = list(urls) if urls is not None else [None] * len(shard_indices)
        with ThreadPoolExecutor(max_workers=max(1, self.shards_in_flight), thread_name_prefix="stl-shard") as pool:
            yield from pool.map(self.__call__, shard_indices, urls)

    def __call__(self, shard_index: int, url: str | None = None) -> ShardOutcome:
        shard = self.store.shard(shard_index)
        if url:  # where the shard is now (the store knows shards by name; they may have moved since registration)
            shard = dataclasses.replace(shard, url=url)
        start = time.perf_counter()
        try:
            num_invalid, bytes_written = self._label(shard)
        except Exception as e:  # noqa: BLE001 - unreadable tar, store or device error: report it with the URL
            text = str(e) if isinstance(e, DecodeFailed) else f"{type(e).__name__}: {e}"
            return ShardOutcome(shard_index, shard.url, ok=False, error=text, seconds=time.perf_counter() - start)
        valid = shard.num_samples - num_invalid
        return ShardOutcome(shard_index, shard.url, ok=True, num_samples=shard.num_samples, num_invalid=num_invalid,
                            views=valid * self.spec.views, seconds=time.perf_counter() - start,
                            bytes_written=bytes_written)

    def decode_job(self, shard: Any) -> DecodeJob:
        """What a decode worker needs to prepare `shard` (a `LabelStore.shard` row) for this work unit."""
        process = self.decode_pool == "process"
        return DecodeJob(url=shard.url, num_samples=shard.num_samples, first_row=shard.first_row,
                         store_seed=self.store.seed, store_path=str(self.store.path), view_spec=self.spec.view_spec,
                         views=self.spec.views, mode=self.chunk_mode, chunk_images=self.images_per_batch,
                         threads=1 if process else self.decode_workers, shared=process)

    def _label(self, shard: Any) -> tuple[int, int]:
        decoder = self.start()
        with self._lock:
            self._active += 1
        try:
            return self._label_run(decoder, shard)
        finally:
            with self._lock:
                self._active -= 1

    def _label_run(self, decoder: DecodeWorkers, shard: Any) -> tuple[int, int]:
        run = _ShardRun(shard, self.spec, dump=self.settings.dump_views_dir is not None)
        chunks = decoder.submit(self.decode_job(shard))
        try:
            for chunk in chunks:
                self.clock.add("read", chunk.read_s)
                self.clock.add("decode", chunk.decode_s)
                if self.device.type == "cuda" and chunk.pixels is not None:
                    # Page-locked here, in this shard's thread: the device loop then only queues the copies
                    # up (no host copy on the thread that keeps the device fed), and the decode worker's
                    # shared memory is let go at once.
                    with self.clock.host("pin"):
                        chunk.pixels = chunk.pixels.pin_memory()
                run.rows.record(chunk)
                with self._lock:
                    self.samples_done += len(chunk.positions)
                    done = self.samples_done
                if self.fault is not None:
                    self.fault.tick(done)
                if chunk.num_valid:
                    self._send(("chunk", run, chunk))
                if run.error:
                    break
        finally:
            self._send((_END, run, None))
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        while not run.done.wait(timeout=1.0):
            self._check_loop()
        if run.error:
            raise RuntimeError(run.error)
        if run.dump is not None:
            self._dump(shard, run.dump, shard.num_samples)
        tokens, cls = run.out.encoded()
        rows = run.rows
        for pos, reason in run.late_errors:
            rows.invalidate(pos, reason)
        with self.clock.host("write"):
            self.writers.write(shard.index, keys=rows.keys, labels=rows.labels, image_hw=rows.image_hw,
                               valid=rows.valid, params=rows.params, tokens=tokens, cls=cls, errors=rows.errors,
                               fingerprints=rows.fingerprints)
        return len(rows.errors), run.out.nbytes + rows.params.nbytes

    def _send(self, msg: tuple) -> None:
        """Hand a message to the device loop (waits while its inbox is full, fails if the loop has died)."""
        while True:
            try:
                self._inbox.put(msg, timeout=1.0)
                return
            except queue.Full:
                self._check_loop()

    def _check_loop(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_alive():
            raise RuntimeError(f"the work unit's device loop stopped: {self._loop_error or 'closed'}")

    # --- the device loop (one thread) ---------------------------------------------------------------------
    def _device_loop(self) -> None:
        try:
            self._prepare_device()
            self._ready.set()
            self._run_device_loop()
        except BaseException as e:  # a bug, not a device error (those fail their batch's shards): say so
            self._loop_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._ready.set()  # after an error too (set after `_loop_error`): `start(wait=True)` reports it

    def _prepare_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.render_backend == "torch" and self.teacher.compiled:
            # The compiled render is built here, before the first batch: a job's compile overlaps its decode
            # processes' start-up, and it is built on the thread and stream that render every batch.
            with _on_stream(self._side_stream):
                warm_up_render(self.spec.view_spec, self.spec.views, self.device, compiled=True)

    def _run_device_loop(self) -> None:
        pending: deque[_Piece] = deque()  # images not in a batch yet, in arrival order
        count = 0  # valid images in `pending`
        in_flight: deque[_InFlight] = deque()  # launched, results not filed yet, oldest first
        while True:
            # Take what has arrived; wait only when there is nothing else to do.
            idle = count < self.images_per_batch and not in_flight and not _any_ended(pending)
            try:
                msg = self._wait_for_work() if idle else self._inbox.get_nowait()
            except queue.Empty:
                msg = False
            if msg is None:  # close()
                while in_flight:
                    self._collect_safely(in_flight.popleft())
                for piece in pending:
                    piece.run.fail("the work unit was closed while the shard was being labelled")
                return
            if msg:
                kind, run, chunk = msg
                if kind == _END:
                    run.decode_ended = True
                    run.check_done()
                elif run.error is None:
                    run.outstanding += chunk.num_valid
                    pending.append(_Piece(run, chunk, 0, chunk.num_valid))
                    count += chunk.num_valid
                continue
            if count >= self.images_per_batch or (count and not in_flight and _any_ended(pending)):
                pieces = _take(pending, self.images_per_batch)
                count -= sum(p.b - p.a for p in pieces)
                launched = self._launch_safely(pieces)
                if launched is not None:
                    in_flight.append(launched)
                while len(in_flight) > BATCHES_QUEUED:  # file the oldest while the device works on the others
                    self._collect_safely(in_flight.popleft())
            elif in_flight:  # nothing to launch yet: file the oldest batch meanwhile
                self._collect_safely(in_flight.popleft())

    def _wait_for_work(self):
        """The next inbox message; the wait counts as "decode_wait" only while some shard is being labelled
        (an idle work unit between jobs is not a device starved by its decoders)."""
        while True:
            start = time.perf_counter()
            try:
                return self._inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            finally:
                if self._active:
                    self.clock.add("decode_wait", time.perf_counter() - start)

    def _launch_safely(self, pieces: list[_Piece]) -> _InFlight | None:
        self.clock.batch_launched()
        try:
            with self.clock.loop_work():
                return self._launch(pieces)
        except Exception as e:  # noqa: BLE001 - a device error fails the shards in this batch, not the loop
            _fail_pieces(pieces, f"{type(e).__name__}: {e}")
            return None

    def _collect_safely(self, done: _InFlight) -> None:
        try:
            self._collect(done)
        except Exception as e:  # noqa: BLE001
            _fail_pieces(done.pieces, f"{type(e).__name__}: {e}")

    def _host_batch(self, pieces: list[_Piece]) -> tuple[list[FlatImages] | None, np.ndarray]:
        """The batch's pixels (or Pillow views) as the pieces' own host buffers (page-locked on a GPU: see
        `_label_run`), padded with the last image to the full batch (one shape for the compiled forward), and
        its view params (V, P)."""
        s, n_img = self.spec.views, sum(p.b - p.a for p in pieces)
        pad = self.images_per_batch - n_img
        params = np.concatenate([p.chunk.params[p.a:p.b] for p in pieces]
                                + [pieces[-1].chunk.params[pieces[-1].b - 1:pieces[-1].b]] * pad)
        params = params.reshape(-1, params.shape[-1])
        if self.chunk_mode == "jpeg":
            return None, params
        per = s if self.chunk_mode == "views" else 1
        parts = [p.chunk.pixels.slice(p.a * per, p.b * per) for p in pieces]
        last = pieces[-1]
        parts += [last.chunk.pixels.slice((last.b - 1) * per, last.b * per)] * pad
        return parts, params

    def _sources(self, pieces: list[_Piece], host: list[FlatImages] | None) -> SourceBatch:
        if host is not None:
            return upload_flat(host, self.device, multiple=1 if self.chunk_mode == "views" else 32)
        return self._decode_on_device(pieces)

    def _decode_on_device(self, pieces: list[_Piece]) -> SourceBatch:
        """The batch's JPEGs decoded by nvJPEG in one call (`labeler.device_jpeg`); a row neither nvJPEG nor
        Pillow can decode becomes an invalid row of its shard, with Pillow's reason."""
        images, owners = [], []
        for p in pieces:
            images += chunk_images(p.chunk, p.a, p.b, p.run.shard.url)
            owners += [(p.run, int(pos)) for pos in p.positions]
        sources, failed = decode_on_device(images, self.device, self.images_per_batch)
        for i, reason in failed:
            run, pos = owners[i]
            run.invalidate(pos, reason)
        return sources

    def _launch(self, pieces: list[_Piece]) -> _InFlight:
        """Queue copy → render → teacher (forward, top-k: one CUDA graph on a GPU) → copy back for one batch;
        nothing here waits for the device.

        On a GPU the copy and the render go on the side stream and only the teacher on the compute stream, which
        waits for them by an event: the next batch is uploaded and rendered while this one's forward runs, so the
        render overlaps the forward instead of adding to it (queued behind it, it would have to fit in a few
        percent of the forward's time)."""
        self.batches += 1
        host, params = self._host_batch(pieces)
        side = self._side_stream
        with _on_stream(side):
            with self.clock.device("copy", side):
                sources = self._sources(pieces, host)
            with self.clock.device("render", side):
                if self.render_backend == "pillow":
                    views = sources.pixels  # the Pillow views themselves, (V, 3, h, w)
                else:
                    index = np.repeat(np.arange(self.images_per_batch), self.spec.views)
                    views = render_batch(sources, index, params, self.spec.view_spec, compiled=self.teacher.compiled)
        if side is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(side)
            views.record_stream(compute)  # allocated on the side stream, read by the forward
        with self.clock.device("forward"):
            tokens, cls = self.teacher.encode_views_async(views)
        if any(p.run.dump is not None for p in pieces):
            seen = views.permute(0, 2, 3, 1).cpu().numpy()
            s, at = self.spec.views, 0
            for p in pieces:
                for pos in p.positions:
                    if p.run.dump is not None:
                        p.run.dump[int(pos)] = seen[at * s:(at + 1) * s]
                    at += 1
        return _InFlight(pieces, tokens, cls)

    def _collect(self, done: _InFlight) -> None:
        """Wait for a batch's results (queued behind its forward) and file them at their shards' rows."""
        with self.clock.host("result_wait"):
            tokens, cls = done.tokens.wait(), done.cls.wait()
        with self.clock.host("file"), self.clock.loop_work():
            s, at = self.spec.views, 0
            for p in done.pieces:
                n = (p.b - p.a) * s
                if p.run.error is None:
                    flat = (p.positions[:, None] * s + np.arange(s)).ravel()
                    p.run.out.put(flat, _rows(tokens, at, at + n), _rows(cls, at, at + n))
                at += n
        self.clock.batch_filed()
        for p in done.pieces:
            p.run.outstanding -= p.b - p.a
            p.run.check_done()
        self.clock.resolve(block=False)  # the events of finished batches: a long job keeps few of them

    def _dump(self, shard, dump: dict[int, np.ndarray], n: int) -> None:
        h, w = self.spec.input_size
        views = np.zeros((n, self.spec.views, h, w, 3), np.uint8)
        for pos, v in dump.items():
            views[pos] = v
        path = Path(self.settings.dump_views_dir) / f"shard-{shard.index:06d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, views)


def _any_ended(pending: Iterable[_Piece]) -> bool:
    """Some pending image belongs to a shard whose decode has ended: its batch will not fill from it."""
    return any(p.run.decode_ended for p in pending)


def _take(pending: deque, n: int) -> list[_Piece]:
    """Up to n images from the front of `pending` (splitting a piece if needed)."""
    out: list[_Piece] = []
    while pending and n > 0:
        p = pending[0]
        k = min(n, p.b - p.a)
        out.append(_Piece(p.run, p.chunk, p.a, p.a + k))
        n -= k
        if p.a + k == p.b:
            pending.popleft()
        else:
            pending[0] = _Piece(p.run, p.chunk, p.a + k, p.b)
    return out


def _rows(enc: EncodedLogits, a: int, b: int) -> EncodedLogits:
    """Rows a..b-1 of a batch's encoded outputs."""
    return EncodedLogits(*(None if x is None else x[a:b] for x in (enc.logit, enc.cls, enc.tail_lse)))


def _fail_pieces(pieces: list[_Piece], error: str) -> None:
    for p in pieces:
        p.run.outstanding -= p.b - p.a
        p.run.fail(error)


def _on_stream(stream: "torch.cuda.Stream | None"):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def build_teacher(spec: Any, settings: WorkerSettings, device: Any):
    """The labeler's model (arch and classes from the spec) with its checkpoint, wrapped as a Teacher."""
    model = create_token_model(spec.arch, num_classes=spec.num_classes, pretrained=False, drop_path_rate=0.0)
    if settings.checkpoint:
        sha = load_checkpoint(model, settings.checkpoint, prefer_ema=True)
        if spec.checkpoint_sha256 and sha != spec.checkpoint_sha256:
            raise ValueError(f"checkpoint {settings.checkpoint} has sha256 {sha[:12]}…, but labeler {spec.name!r} "
                             f"in the store was made with {spec.checkpoint_sha256[:12]}…")
    return Teacher(model, spec.mean, spec.std, spec.topk, device=device, amp=settings.amp, compile=settings.compile,
                   cuda_graph=settings.cuda_graph, channels_last=settings.channels_last)
