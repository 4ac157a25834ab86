"""The photometric slots of a batch as one fixed-shape device function, replayed as one CUDA graph.

`apply_photometric` (trainer/photometric_torch.py) groups each slot's samples by op on the host: little
device work, but a few hundred torch calls per batch, each a launch issued from Python, and the student's
end-to-end step is host-bound. Here every call issues the same kernels on tensors of the same shapes, with
no host data in their arguments, so the whole thing is captured once (`labeler.cuda_graph.GraphedFunction`)
and each batch costs one upload of its slot arrays and one graph launch:

* point ops (Invert, Posterize, Solarize, SolarizeAdd, Brightness): their tables are the ops applied to a
  0..255 ramp for every sample (exact: they act on each level alone; B × 3 × 256 values, cheap), each sample
  keeping its own op's table;
* ops that read the image (AutoContrast, Equalize, Contrast tables; Color, Sharpness): run on a fixed number
  of rows per op (`capacity`, an eighth of the batch to start with), picked by host-made row lists padded with
  a spare row, so their device work is a few times the samples that drew them, not the whole batch per op;
* then each slot's tables are applied by one gather, as in `apply_photometric`.

The maths are trainer/photometric_torch.py's own functions, so the pixels are `apply_photometric`'s
(tests/test_photometric_graph.py compares both on every op). A batch whose draws need more rows than the
capacity for one op (rare: an op is drawn by about B/30 samples per slot with the paper's settings) takes
the grouped ops instead.
"""
from __future__ import annotations

import numpy as np
import torch

from labeler.cuda_graph import GraphedFunction
from trainer.photometric_torch import (
    OPS, apply_photometric, apply_table, auto_contrast, auto_contrast_lut, brightness, color, contrast, contrast_lut,
    check_images, equalize, equalize_lut, invert, posterize, sharpness, solarize, solarize_add, to_table,
)

POINT_OPS = (invert, posterize, solarize, solarize_add, brightness)  # table = the op on the level ramp
STAT_LUTS = ((auto_contrast, auto_contrast_lut), (equalize, equalize_lut), (contrast, contrast_lut))
IMAGE_OPS = (color, sharpness)  # read neighbouring pixels or channels: no table
ROW_OPS = tuple(op for op, _ in STAT_LUTS) + IMAGE_OPS  # the ops run on picked rows, in `rows`' order
_ROW_KIND = np.array([OPS.index(op) for op in ROW_OPS])


def default_capacity(batch: int) -> int:
    """Rows per op and slot to start with: an eighth of the batch, at least 8 (at most the batch). With the
    paper's RandAugment an op is drawn by about batch/30 samples of a slot (binomial: for a batch of 128,
    mean 4.3, more than 16 about once in 700,000 slots); `RowCapacity` doubles it if batches overflow."""
    return min(batch, max(8, -(-batch // 8)))


def pack_slots(photo_ops, photo_args) -> torch.Tensor:
    """The batch's slot arrays (B, S) each → one float32 (2, B, S) host tensor [op index, argument]: one
    upload per batch. Op indices are small integers, exact in float32."""
    ops = np.asarray(photo_ops.cpu() if torch.is_tensor(photo_ops) else photo_ops, dtype=np.float32)
    args = np.asarray(photo_args.cpu() if torch.is_tensor(photo_args) else photo_args, dtype=np.float32)
    if ops.ndim != 2 or args.shape != ops.shape:
        raise ValueError(f"photo_ops {ops.shape} and photo_args {args.shape} must both be (B, S)")
    if ops.size and (ops.min() < -1 or ops.max() >= len(OPS)):
        raise ValueError(f"photo_ops must lie in [-1, {len(OPS) - 1}], got {ops.min():.0f}..{ops.max():.0f}")
    return torch.from_numpy(np.stack([ops, args]))


def slot_rows(photo_ops, capacity: int) -> torch.Tensor | None:
    """int64 (S, len(ROW_OPS), capacity): per slot and row op, the samples that drew it, padded with B (the
    spare row); None when some op was drawn by more than `capacity` samples of a slot."""
    ops = np.asarray(photo_ops.cpu() if torch.is_tensor(photo_ops) else photo_ops).astype(np.int64)
    n, slots = ops.shape
    hit = ops.T[:, None, :] == _ROW_KIND[None, :, None]  # (S, K, B)
    if hit.sum(axis=2).max(initial=0) > capacity:
        return None
    # Stable sort puts each op's samples first, in sample order; the rest become the spare row B.
    order = np.argsort(~hit, axis=2, kind="stable")[:, :, :capacity]
    taken = np.take_along_axis(hit, order, axis=2)
    return torch.from_numpy(np.where(taken, order, n))


def apply_photometric_fixed(images: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """images uint8 (B, 3, H, W), slots float32 (2, B, S) (`pack_slots`), rows int64 (S, K, capacity)
    (`slot_rows`), all on one device → uint8 (B, 3, H, W), slot order as `apply_photometric`.

    No host reads, no data-dependent shapes: capturable as a CUDA graph."""
    n = images.shape[0]
    out = _with_spare_row(images, 0)  # (B + 1, 3, H, W): padded picks read and write the spare row
    kinds, args = _with_spare_row(slots[0].round().to(torch.int64), -1), _with_spare_row(slots[1], 0)  # (B + 1, S)
    ramp = torch.arange(256, device=images.device, dtype=torch.uint8).view(1, 1, 1, 256).expand(n + 1, 3, 1, 256)
    for s in range(slots.shape[2]):
        kind, arg = kinds[:, s], args[:, s]
        table = ramp[:, :, 0].clone()  # identity: samples with no table op in this slot
        for op in POINT_OPS:
            table = torch.where((kind == OPS.index(op)).view(-1, 1, 1), op(ramp, arg)[:, :, 0], table)
        for j, (_, lut) in enumerate(STAT_LUTS):
            r = rows[s, j]
            table.index_copy_(0, r, to_table(lut(out.index_select(0, r), arg.index_select(0, r))))
        out = apply_table(out, table)
        for j, op in enumerate(IMAGE_OPS, start=len(STAT_LUTS)):
            r = rows[s, j]
            out.index_copy_(0, r, op(out.index_select(0, r), arg.index_select(0, r)))
    return out[:n]


def _with_spare_row(t: torch.Tensor, fill) -> torch.Tensor:
    """`t` with one more row (index B) filled with `fill`: where the row lists' padding points."""
    return torch.cat([t, torch.full_like(t[:1], fill)])


GROW_AFTER = 20  # batches seen before the capacity is judged
GROW_WHEN = 0.05  # share of those batches that overflowed it: then it doubles


class RowCapacity:
    """Rows per op and slot of the fixed-shape ops: `default_capacity` of the batch at first, doubled (up to
    the batch) when more than GROW_WHEN of GROW_AFTER or more batches overflowed it (a RandAugment that
    applies more ops than the paper's); `grew` says the last `rows` call changed it (a new capture)."""

    def __init__(self, capacity: int | None = None):
        self.capacity, self.grew = capacity, False
        self._seen = self._overflowed = 0

    def rows(self, photo_ops, batch: int) -> torch.Tensor | None:
        """`slot_rows` at the current capacity; None (and counted) when the batch overflows it."""
        self.capacity = self.capacity or default_capacity(batch)
        rows = slot_rows(photo_ops, self.capacity)
        self._seen += 1
        self._overflowed += rows is None
        self.grew = (self._seen >= GROW_AFTER and self._overflowed > GROW_WHEN * self._seen
                     and self.capacity < batch)
        if self.grew:
            self.capacity = min(batch, 2 * self.capacity)
            self._seen = self._overflowed = 0
        return rows


class PhotometricGraph:
    """`apply_photometric` for a training device: on CUDA the batch shape seen first runs as one captured
    graph of `apply_photometric_fixed`; CPUs, other shapes (a last partial batch) and a batch that needs
    more rows than its `RowCapacity` for one op take the grouped ops (`fallbacks` counts the batches that
    did; a capacity that grows is captured again).

    The returned tensor of a graphed call is the graph's output buffer, overwritten by the next call: the
    caller uses it (the normalisation makes a new tensor) before calling again, on the same stream."""

    def __init__(self, graphed: bool = True, capacity: int | None = None):
        self.graphed = bool(graphed)
        self.rows = RowCapacity(capacity)
        self.fallbacks = 0
        self._graph = self._new_graph()
        self._shape: tuple | None = None  # (images, slots) shapes the graph is for

    @staticmethod
    def _new_graph() -> GraphedFunction:
        return GraphedFunction(lambda images, slots, rows: (apply_photometric_fixed(images, slots, rows),))

    @property
    def failed(self) -> str | None:
        """Why the capture failed (every call then runs the fixed-shape ops directly), or None."""
        return self._graph.failed

    @property
    def captured(self) -> bool:
        return self._graph.captured

    def __call__(self, images: torch.Tensor, photo_ops, photo_args) -> torch.Tensor:
        if not self.graphed or images.device.type != "cuda":
            return apply_photometric(images, photo_ops, photo_args)
        check_images(images)
        slots = pack_slots(photo_ops, photo_args)
        if slots.shape[1] != images.shape[0]:
            raise ValueError(f"photo_ops has {slots.shape[1]} rows for {images.shape[0]} images")
        self._shape = self._shape or (tuple(images.shape), tuple(slots.shape))
        if (tuple(images.shape), tuple(slots.shape)) != self._shape:  # the graph is for the first batch shape
            self.fallbacks += 1
            return apply_photometric(images, photo_ops, photo_args)
        rows = self.rows.rows(photo_ops, images.shape[0])
        if self.rows.grew:
            self._graph = self._new_graph()  # the old graph and its memory go with the last reference
        if rows is None:
            self.fallbacks += 1
            return apply_photometric(images, photo_ops, photo_args)
        return self._graph(images, slots, rows)[0]
