"""One shard → decoded chunks: the CPU half of the labeling work unit, run in a decode process or thread.

A `DecodeJob` names a shard and everything needed to prepare its samples for the device without
the store or torch's device: the tar is read, each image decoded once (the pixels of
`labelstore.decode_image`, which the trainer replays: as a Pillow image for the Pillow renderer, as an array
by `labeler.jpeg_decode.decode_rgb` otherwise), its S view params drawn from (store seed, row), its bytes
fingerprinted, and the samples handed on in chunks of `chunk_images` valid images.
A chunk's pixels are one `FlatImages` (the images' own bytes, no padding; in shared memory when the chunk
crosses a process boundary) or, for the Pillow backend, the S views of each image rendered here. Invalid
samples (undecodable image, no label, a duplicate key) travel in the chunk as rows with an error, so every
row of the shard is accounted for.

The registered row count is checked while reading: a shard that outgrew its rows stops before any
compute (nothing of it gets written); one that shrank fails at its end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import numpy as np

from labeler.ordered_prefetch import ordered_prefetch
from labeler.flat_images import FlatImages, pack_flat
from labeler.jpeg_decode import decode_rgb, plain_jpeg_hw
from labelstore import ImageDecodeError, ShardCapacityError, ShardConflict, decode_image, draw_views, render
from labelstore.shard_format import ShardSample, image_fingerprint, iter_shard
from labelstore.views import ViewSpec

CHUNK_MODES = ("pixels", "views", "jpeg")


@dataclass(frozen=True)
class DecodeJob:
    """What a decode worker needs to prepare one shard (picklable, small)."""

    url: str
    num_samples: int  # rows registered for the shard in the store
    first_row: int  # its first row: view params are drawn from (store seed, row)
    store_seed: int
    store_path: str  # named in errors only
    view_spec: ViewSpec
    views: int  # S
    mode: str = "pixels"  # pixels: decoded images; views: S Pillow-rendered views each; jpeg: nvJPEG-able bytes kept
    chunk_images: int = 32
    threads: int = 1  # decode threads inside the job (a decode process uses 1: the processes are the pool)
    shared: bool = False  # chunks cross a process boundary: pack pixels in shared memory

    def __post_init__(self) -> None:
        if self.mode not in CHUNK_MODES:
            raise ValueError(f"DecodeJob.mode must be one of {CHUNK_MODES}, got {self.mode!r}")
        if self.chunk_images < 1 or self.threads < 1 or self.views < 1:
            raise ValueError("DecodeJob: chunk_images, threads and views must be >= 1")


@dataclass
class DecodedChunk:
    """Consecutive rows of a shard. Row arrays have one entry per row; `params`, `pixels` and `jpegs`
    one per valid row (in row order); `pixels` holds S views per valid row in mode "views"."""

    positions: np.ndarray  # (n,) row positions within the shard
    keys: list[str]
    names: list[str]  # "<key>.<ext>" of each row's image member (named in errors)
    labels: np.ndarray  # (n,) int32
    errors: list[str | None]
    image_hw: np.ndarray  # (n, 2) int32 (0 for invalid rows)
    fingerprints: np.ndarray  # (n,) uint64
    params: np.ndarray  # (valid, S, P) float32
    pixels: FlatImages | None = None
    jpegs: list[bytes] = field(default_factory=list)  # mode "jpeg": undecoded bytes of the nvJPEG-able valid rows
    jpeg_rows: np.ndarray | None = None  # mode "jpeg": (valid,) bool, which valid rows are in `jpegs` (the others in `pixels`)
    read_s: float = 0.0  # busy seconds spent reading / decoding this chunk (for the stage clock)
    decode_s: float = 0.0

    # Derived once per chunk (the device loop asks per piece and, on the nvJPEG path, per row).
    @cached_property
    def valid_mask(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    @cached_property
    def valid_positions(self) -> np.ndarray:
        return self.positions[self.valid_mask]

    @cached_property
    def valid_hw(self) -> np.ndarray:
        """(valid, 2) image sizes of the valid rows (for mode "jpeg": read from the JPEG header)."""
        return self.image_hw[self.valid_mask]

    @cached_property
    def num_valid(self) -> int:
        return int(self.valid_mask.sum())


@dataclass
class _Prepared:
    pos: int
    sample: ShardSample
    hw: tuple[int, int] = (0, 0)
    params: np.ndarray | None = None
    pixels: np.ndarray | None = None  # HWC, or (S, h, w, 3) views in mode "views"
    jpeg: bytes | None = None
    error: str | None = None
    fingerprint: int = 0
    seconds: float = 0.0


def _prepare(job: DecodeJob, item: tuple[int, ShardSample]) -> _Prepared:
    pos, sample = item
    start = time.perf_counter()
    out = _Prepared(pos, sample)
    if sample.image is not None:
        out.fingerprint = image_fingerprint(sample.image)
    if sample.error is not None:
        out.error = sample.error
        return out
    row = job.first_row + pos
    hw = plain_jpeg_hw(sample.image) if job.mode == "jpeg" else None  # nvJPEG decodes it; others go to Pillow
    if hw is not None:
        out.hw, out.jpeg = hw, bytes(sample.image)
    else:
        name = f"{job.url}:{sample.image_name}"
        try:
            if job.mode == "views":  # the Pillow renderer renders from Pillow's image: no array in between
                image = decode_image(sample.image, name)
                out.hw = (image.height, image.width)
            else:
                out.pixels = decode_rgb(sample.image, name)
                out.hw = out.pixels.shape[:2]
        except ImageDecodeError as e:
            out.error = str(e)
            return out
    out.params = draw_views(job.view_spec, job.store_seed, row, job.views, out.hw)
    if job.mode == "views":
        out.pixels = np.stack([render(image, p, job.view_spec) for p in out.params])
    out.seconds = time.perf_counter() - start
    return out


def _chunk(job: DecodeJob, items: list[_Prepared], read_s: float) -> DecodedChunk:
    valid = [it for it in items if it.error is None]
    if job.mode == "views":
        flat_list = [v for it in valid for v in it.pixels]
    else:
        flat_list = [it.pixels for it in valid if it.pixels is not None]
    pixels = pack_flat(flat_list, shared=job.shared) if flat_list else None
    params = (np.stack([it.params for it in valid]) if valid
              else np.zeros((0, job.views, 0), np.float32))
    return DecodedChunk(
        positions=np.array([it.pos for it in items], np.int64),
        keys=[it.sample.key for it in items],
        names=[it.sample.image_name for it in items],
        labels=np.array([it.sample.label for it in items], np.int32),
        errors=[it.error for it in items],
        image_hw=np.array([it.hw for it in items], np.int32).reshape(-1, 2),
        fingerprints=np.array([it.fingerprint for it in items], np.uint64),
        params=params,
        pixels=pixels,
        jpegs=[it.jpeg for it in valid if it.jpeg is not None] if job.mode == "jpeg" else [],
        jpeg_rows=np.array([it.jpeg is not None for it in valid], bool) if job.mode == "jpeg" else None,
        read_s=read_s,
        decode_s=sum(it.seconds for it in items),
    )


def _samples(job: DecodeJob, clock: list[float]) -> Iterator[tuple[int, ShardSample]]:
    """(position, sample) of every sample; stops at once if the shard outgrew its registered rows."""
    pos = -1
    reader = iter_shard(job.url)
    while True:
        t0 = time.perf_counter()
        sample = next(reader, None)
        clock[0] += time.perf_counter() - t0
        if sample is None:
            break
        pos += 1
        if pos >= job.num_samples:  # before any compute: nothing of this shard gets written
            raise ShardCapacityError(
                f"shard {job.url} has more samples than the {job.num_samples} rows registered for it in "
                f"{job.store_path} (the file changed since it was registered): nothing was written; "
                "restore the original file or label it into a new store")
        yield pos, sample
    if pos + 1 != job.num_samples:
        raise ShardConflict(f"shard {job.url} has {pos + 1} samples but {job.num_samples} were registered "
                            f"in {job.store_path}: the file changed since it was registered")


def decode_chunks(job: DecodeJob) -> Iterator[DecodedChunk]:
    """Every row of the shard, in order, in chunks of up to `chunk_images` valid images (+ the invalid rows
    between them). Raises ShardReadError / ShardCapacityError / ShardConflict for a bad shard."""
    read = [0.0]
    items: list[_Prepared] = []
    valid = 0
    prepared = (ordered_prefetch(lambda it: _prepare(job, it), _samples(job, read), threads=job.threads,
                                 depth=4 * job.threads) if job.threads > 1
                else (_prepare(job, it) for it in _samples(job, read)))
    try:
        for item in prepared:
            items.append(item)
            valid += item.error is None
            if valid == job.chunk_images:
                yield _chunk(job, items, read[0])
                items, valid, read[0] = [], 0, 0.0
        if items:
            yield _chunk(job, items, read[0])
    finally:
        close = getattr(prepared, "close", None)
        if close is not None:
            close()
