"""The labeling work unit: one dataset shard → its rows of one labeler in the store, `done` last.

Three stages overlap so the device never waits on the CPU (docs/design.md, "The labeling work unit"):

1. a decode pool (`labeler.decode_pool`, one thread per CPU the worker owns) decodes each image once
   and draws its S view params; a producer thread groups the decoded images into forward batches of
   `batch_size // S` images and packs each batch into page-locked host memory (`pack_images`);
2. the device loop copies a batch up on a side stream (non-blocking), renders all its views in one
   `render_batch` call, runs the teacher and the top-k + tail on the device, and queues the results'
   copy back into pinned host memory behind an event;
3. while the device works on that batch, the loop collects the previous batch's results.

The last batch is padded to the full batch (its padding views are dropped), so a compiled teacher
sees one shape. On CPU the default renderer is Pillow in the decode threads (faster there); the
stages then simply run in turn. Results stay in memory until the shard is complete and are written
in one `write_shard` call: a worker killed mid-shard leaves nothing behind, and a retry (same params
from the same seeds, same teacher) writes the same rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from labeler.decode_pool import BackgroundIter, ordered_prefetch, resolve_decode_threads
from labeler.device import resolve_device
from labeler.models import create_token_model
from labeler.models.checkpoint import load_checkpoint
from labeler.render_batch import pack_images, render_batch, upload
from labeler.stage_clock import PHASES, StageClock
from labeler.teacher import HostCopy, Teacher, resolve_compile
from labelstore import (NUM_PARAMS, EncodedLogits, ImageDecodeError, LabelStore, ShardCapacityError, ShardConflict,
                        decode_image, draw_views, render)
from labelstore.shard_format import ShardSample, image_fingerprint, iter_shard

RENDER_BACKENDS = ("auto", "torch", "pillow")
DECODE_DEVICES = ("cpu", "cuda")
__all__ = ["PHASES", "RENDER_BACKENDS", "DECODE_DEVICES", "WorkerSettings", "FaultInjection", "ShardOutcome", "gpu_decodable_jpeg",
           "ShardLabeler", "build_teacher"]


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs the teacher; what it computes comes from the labeler's spec in the store."""

    checkpoint: str | None
    batch_size: int = 256  # views per forward pass (rounded down to whole images: S views each)
    amp: str = "bf16"
    compile: bool | str = "auto"  # auto = torch.compile on CUDA, eager on CPU
    device: str = "auto"  # auto = cuda if available, else cpu
    render_backend: str = "auto"  # auto = batched torch on cuda, Pillow (the reference renderer) on cpu
    decode_threads: int = 0  # 0 = one per CPU this worker may use
    decode_device: str = "cpu"  # cuda = decode baseline JPEGs with nvJPEG (torchvision); others stay on Pillow
    dump_views_dir: str | None = None  # debug hook: save every rendered view of a shard (tests)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.render_backend not in RENDER_BACKENDS:
            raise ValueError(f"render_backend must be one of {RENDER_BACKENDS}, got {self.render_backend!r}")
        resolve_decode_threads(self.decode_threads)  # the resolvers' own checks: one message per setting
        resolve_compile(self.compile, torch.device("cpu"))
        if self.decode_device not in DECODE_DEVICES:
            raise ValueError(f"decode_device must be one of {DECODE_DEVICES}, got {self.decode_device!r}")


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


@dataclass
class _Prepared:
    """One sample after decode (+ Pillow render on CPU); `error` set when the sample is invalid."""

    pos: int
    sample: ShardSample
    image_hw: tuple[int, int] = (0, 0)
    params: np.ndarray | None = None
    pixels: np.ndarray | None = None  # HWC uint8 RGB (torch backend, CPU decode)
    jpeg: bytes | None = None  # undecoded baseline JPEG (decode_device cuda)
    views: np.ndarray | None = None  # (S, h, w, 3) uint8 (Pillow backend)
    error: str | None = None
    fingerprint: int = 0  # of the encoded image bytes (0 = no image): inputs are checked against the store


@dataclass
class _Batch:
    """A forward batch as the producer hands it over: every sample consumed since the last batch (valid
    or not, in order) and the valid ones packed for the device, padded to the full batch."""

    items: list[_Prepared]
    images: list[_Prepared]
    host: torch.Tensor | None  # (N, H, W, 3) pixels, or (V, h, w, 3) Pillow-rendered views; pinned on CUDA
    hw: np.ndarray | None


@dataclass
class _InFlight:
    images: list[_Prepared]
    tokens: HostCopy
    cls: HostCopy


def gpu_decodable_jpeg(data: bytes) -> tuple[int, int] | None:
    """(h, w) of a JPEG that nvJPEG decodes like Pillow would (RGB or grey), read from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                return img.height, img.width
    except Exception:  # noqa: BLE001 - not decodable: the Pillow path reports it
        return None
    return None


class ShardLabeler:
    """The work unit: label one shard into the store. Loads the teacher once; call once per shard."""

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
        self.decode_threads = resolve_decode_threads(settings.decode_threads)
        self.images_per_batch = max(1, settings.batch_size // self.spec.views)
        self.teacher = teacher if teacher is not None else build_teacher(self.spec, settings, self.device)
        self.fault = fault
        self.samples_done = 0  # per process, across shards: what the fault switch counts
        self.clock = StageClock(self.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def views_per_batch(self) -> int:
        """The one forward shape: whole images of S views each (the last batch is padded to it)."""
        return self.images_per_batch * self.spec.views

    # --- per sample (decode threads) ----------------------------------------------------------------
    def _prepare(self, item: tuple[int, ShardSample], first_row: int, url: str) -> _Prepared:
        out = self._decode(item, first_row, url)
        if out.sample.image is not None:  # hashed here, in the decode threads, not on the device loop
            out.fingerprint = image_fingerprint(out.sample.image)
        return out

    def _decode(self, item: tuple[int, ShardSample], first_row: int, url: str) -> _Prepared:
        pos, sample = item
        if sample.error is not None:
            return _Prepared(pos, sample, error=sample.error)
        gpu_hw = gpu_decodable_jpeg(sample.image) if self.settings.decode_device == "cuda" else None
        if gpu_hw is not None:
            params = draw_views(self.spec.view_spec, self.store.seed, first_row + pos, self.spec.views, gpu_hw)
            return _Prepared(pos, sample, gpu_hw, params, jpeg=bytes(sample.image))
        start = time.perf_counter()
        try:
            image = decode_image(sample.image, f"{url}:{sample.image_name}")
        except ImageDecodeError as e:
            return _Prepared(pos, sample, error=str(e))
        hw = (image.height, image.width)
        params = draw_views(self.spec.view_spec, self.store.seed, first_row + pos, self.spec.views, hw)
        if self.render_backend == "torch":
            out = _Prepared(pos, sample, hw, params, pixels=np.asarray(image))
        else:
            out = _Prepared(pos, sample, hw, params, views=np.stack([render(image, p, self.spec.view_spec) for p in params]))
        self.clock.add("decode", time.perf_counter() - start)
        return out

    # --- producer thread: samples → packed forward batches -------------------------------------------
    def _batches(self, shard) -> Iterator[_Batch]:
        prepared = ordered_prefetch(lambda it: self._prepare(it, shard.first_row, shard.url), self._samples(shard),
                                    threads=self.decode_threads, depth=max(2 * self.images_per_batch, 4 * self.decode_threads))
        items: list[_Prepared] = []
        images: list[_Prepared] = []
        with contextlib.closing(prepared):
            for item in prepared:
                items.append(item)
                if item.error is None:
                    images.append(item)
                if len(images) == self.images_per_batch:
                    yield self._pack(items, images)
                    items, images = [], []
        if items:
            yield self._pack(items, images)

    def _pack(self, items: list[_Prepared], images: list[_Prepared]) -> _Batch:
        if not images:
            return _Batch(items, images, None, None)
        padded = images + [images[-1]] * (self.images_per_batch - len(images))  # one shape for the compiled forward
        pin = self.device.type == "cuda"
        if self.render_backend == "pillow":
            host, hw = pack_images([v for im in padded for v in im.views], multiple=1, pin_memory=pin)
        elif self.settings.decode_device == "cuda":
            return _Batch(items, images, None, np.array([im.image_hw for im in padded], np.int64))
        else:
            host, hw = pack_images([im.pixels for im in padded], pin_memory=pin)
        return _Batch(items, images, host, hw)

    # --- per shard ------------------------------------------------------------------------------------
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
            self.clock.add("read", time.perf_counter() - t0)
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
        rows = _ShardRows(n, s)
        out = _ResultBuffers(n, s, spec)
        dump = {} if self.settings.dump_views_dir else None
        pending: _InFlight | None = None
        batches = BackgroundIter(self._batches(shard), depth=2)
        with contextlib.closing(batches):
            it = iter(batches)
            while True:
                with self.clock.host("decode_wait"):  # the device loop had nothing to do
                    batch = next(it, None)
                if batch is None:
                    break
                launched = self._launch(batch, rows, dump) if batch.images else None
                for item in batch.items:
                    rows.record(item)
                    self.samples_done += 1
                    if self.fault is not None:
                        self.fault.tick(self.samples_done)
                if pending is not None:
                    self._collect(pending, out)
                pending = launched
            if pending is not None:
                self._collect(pending, out)
        self.clock.resolve()
        if dump is not None:
            self._dump(shard, dump, n)
        tokens, cls = out.encoded()
        with self.clock.host("write"):
            self.labels.write_shard(shard.index, keys=rows.keys, labels=rows.labels, image_hw=rows.image_hw,
                                    valid=rows.valid, params=rows.params, tokens=tokens, cls=cls, errors=rows.errors,
                                    fingerprints=rows.fingerprints)
        return len(rows.errors), out.nbytes + rows.params.nbytes

    def _sources(self, batch: _Batch):
        """The batch's images (or Pillow views) on the device, copied on the side stream."""
        if batch.host is not None:
            return upload(batch.host, batch.hw, self.device)
        return self._decode_on_device(batch)

    def _decode_on_device(self, batch: _Batch):
        """nvJPEG decode of the batch (`decode_device: cuda`); a batch it refuses is decoded by Pillow."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            data = [torch.frombuffer(bytearray(im.jpeg), dtype=torch.uint8) for im in batch.images]
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            decoded = None
        if decoded is None or any(tuple(d.shape[1:]) != tuple(im.image_hw) for d, im in zip(decoded, batch.images)):
            for im in list(batch.images):
                try:
                    im.pixels = np.asarray(decode_image(im.jpeg, im.sample.image_name))
                except ImageDecodeError as e:
                    im.error, im.params = str(e), None
            batch.images[:] = [im for im in batch.images if im.error is None]
            if not batch.images:
                return None
            padded = batch.images + [batch.images[-1]] * (self.images_per_batch - len(batch.images))
            host, hw = pack_images([im.pixels for im in padded], pin_memory=True)
            return upload(host, hw, self.device)
        decoded = list(decoded) + [decoded[-1]] * (self.images_per_batch - len(decoded))
        h, w = (int(-(-max(d.shape[i + 1] for d in decoded) // 32) * 32) for i in range(2))
        pixels = torch.zeros((len(decoded), 3, h, w), dtype=torch.uint8, device=self.device)
        for i, d in enumerate(decoded):
            pixels[i, :, : d.shape[1], : d.shape[2]] = d
        from labeler.render_batch import SourceBatch

        return SourceBatch(pixels, batch.hw)

    def _launch(self, batch: _Batch, rows: "_ShardRows", dump: dict | None) -> _InFlight | None:
        """Queue copy → render → forward → top-k → copy back for one batch; nothing here waits for the device."""
        with self.clock.device("copy", self._copy_stream), _on_stream(self._copy_stream):
            sources = self._sources(batch)
        if sources is None:  # every image of a GPU-decoded batch turned out undecodable
            return None
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            sources.pixels.record_stream(torch.cuda.current_stream(self.device))  # allocated on the side stream
        with self.clock.device("render"):
            if self.render_backend == "pillow":
                views = sources.pixels  # the Pillow views themselves, (V, 3, h, w)
            else:
                index = np.repeat(np.arange(self.images_per_batch), self.spec.views)
                params = np.concatenate([im.params for im in batch.images]
                                        + [batch.images[-1].params] * (self.images_per_batch - len(batch.images)))
                views = render_batch(sources, index, params, self.spec.view_spec)
        with self.clock.device("forward"):
            cls_logits, token_logits = self.teacher.forward(views)
        with self.clock.device("topk"):
            tokens, cls = self.teacher.encode_async(token_logits), self.teacher.encode_async(cls_logits)
        if dump is not None:
            seen = views.permute(0, 2, 3, 1).cpu().numpy()
            for j, im in enumerate(batch.images):
                dump[im.pos] = seen[j * self.spec.views:(j + 1) * self.spec.views]
        return _InFlight(list(batch.images), tokens, cls)

    def _collect(self, done: _InFlight, out: "_ResultBuffers") -> None:
        """Wait for a batch's results (queued behind its forward) and file them at their rows."""
        with self.clock.host("result_wait"):
            tokens, cls = done.tokens.wait(), done.cls.wait()
        with self.clock.host("write"):
            s = self.spec.views
            flat = (np.array([im.pos for im in done.images])[:, None] * s + np.arange(s)).ravel()
            out.put(flat, tokens[: len(flat)], cls[: len(flat)])

    def _dump(self, shard, dump: dict[int, np.ndarray], n: int) -> None:
        h, w = self.spec.input_size
        views = np.zeros((n, self.spec.views, h, w, 3), np.uint8)
        for pos, v in dump.items():
            views[pos] = v
        path = Path(self.settings.dump_views_dir) / f"shard-{shard.index:06d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, views)


def _on_stream(stream: "torch.cuda.Stream | None"):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class _ShardRows:
    """The samples table of one shard as the work unit fills it: keys, labels, sizes, fingerprints, validity, params, errors."""

    def __init__(self, n: int, s: int):
        self.keys, self.labels = [""] * n, np.full(n, -1, np.int32)
        self.image_hw, self.valid = np.zeros((n, 2), np.int32), np.zeros(n, bool)
        self.params = np.zeros((n, s, NUM_PARAMS), np.float32)
        self.fingerprints = np.zeros(n, np.uint64)  # of the encoded image bytes: inputs are checked against the store
        self.errors: list[dict[str, str]] = []
        self._seen: set[str] = set()

    def record(self, item: _Prepared) -> None:
        pos, key = item.pos, item.sample.key
        if key in self._seen:  # keep the first one joinable by `__key__`; this row stays invalid
            key = f"{key}#duplicate-at-{pos}"
        self._seen.add(key)
        self.keys[pos], self.labels[pos] = key, item.sample.label
        self.fingerprints[pos] = item.fingerprint
        if item.error is not None:
            self.errors.append({"key": key, "reason": item.error})
        else:
            self.valid[pos], self.image_hw[pos], self.params[pos] = True, item.image_hw, item.params


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
