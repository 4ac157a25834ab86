"""trainer.photometric_graph: the fixed-shape (graphable) photometric slots give `apply_photometric`'s pixels.

On real photos and random images, every op in every slot position, mixed with unapplied slots. The CUDA
graph itself is checked on a GPU (docker/bench-gpu.sh runs these tests there)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.photometric_graph import (
    GROW_AFTER, IMAGE_OPS, POINT_OPS, ROW_OPS, STAT_LUTS, PhotometricGraph, RowCapacity, apply_photometric_fixed,
    default_capacity, pack_slots, slot_rows,
)
from trainer.photometric_torch import OPS, apply_photometric

skdata = pytest.importorskip("skimage.data")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# timm's argument range per op (enhance factors, posterize bits, solarize threshold, solarize-add amount)
ARGS = {"posterize": (1, 8), "solarize": (0, 256), "solarize_add": (0, 128)}


def batch(n: int, slots: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """n images (real photos first, then noise and a flat one) with `slots` random slots each."""
    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    ims = [np.ascontiguousarray(p[:96, :112]) for p in photos]
    ims.append((ims[1] // 3 + 60).astype(np.uint8))  # a narrow histogram
    ims.append(np.full((96, 112, 3), 77, np.uint8))  # one level only: AutoContrast / Equalize leave it
    while len(ims) < n:
        ims.append(rng.integers(0, 256, (96, 112, 3), dtype=np.uint8))
    images = torch.from_numpy(np.stack(ims[:n])).permute(0, 3, 1, 2).contiguous()
    ops = np.where(rng.random((n, slots)) < 0.8, rng.integers(0, len(OPS), (n, slots)), -1).astype(np.int8)
    args = rng.uniform(0.1, 1.9, (n, slots)).astype(np.float32)
    for name, (lo, hi) in ARGS.items():
        k = [op.__name__ for op in OPS].index(name)
        args = np.where(ops == k, rng.integers(lo, hi + 1, (n, slots)).astype(np.float32), args)
    return images, ops, args


def test_the_three_kinds_cover_every_op_once():
    kinds = [*POINT_OPS, *(op for op, _ in STAT_LUTS), *IMAGE_OPS]
    assert sorted(op.__name__ for op in kinds) == sorted(op.__name__ for op in OPS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def fixed(images, ops, args, capacity=None):
    rows = slot_rows(ops, capacity or len(ops))
    assert rows is not None
    return apply_photometric_fixed(images, pack_slots(ops, args), rows)


@pytest.mark.parametrize("seed,capacity", [(0, None), (1, 12), (2, 8)])
def test_fixed_slots_give_the_grouped_pixels(seed, capacity):
    images, ops, args = batch(24, 3, seed)
    want = apply_photometric(images, ops, args)
    got = fixed(images, ops, args, capacity)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    assert torch.equal(got, want), f"{(got.int() - want.int()).abs().max()} levels apart"


@pytest.mark.parametrize("k", range(len(OPS)), ids=[op.__name__ for op in OPS])
def test_each_op_alone_in_every_sample_and_slot(k):
    images, _, args = batch(8, 2, 5)
    ops = np.full((8, 2), k, np.int8)
    ops[::3, 1] = -1  # some samples skip the second slot
    torch.testing.assert_close(fixed(images, ops, args), apply_photometric(images, ops, args), atol=0, rtol=0)


def test_no_slot_applied_leaves_the_images():
    images, _, args = batch(6, 2, 3)
    assert torch.equal(fixed(images, np.full((6, 2), -1), args), images)


def test_slot_rows_list_each_ops_samples_padded_with_the_spare_row():
    k = {op: OPS.index(op) for op in ROW_OPS}
    invert = [op.__name__ for op in OPS].index("invert")  # a point op: no rows
    ops = np.array([[k[ROW_OPS[0]], -1], [invert, k[ROW_OPS[-1]]], [k[ROW_OPS[0]], k[ROW_OPS[-1]]]])
    rows = slot_rows(ops, capacity=2).numpy()
    assert rows.shape == (2, len(ROW_OPS), 2)
    assert rows[0, 0].tolist() == [0, 2] and rows[1, -1].tolist() == [1, 2]
    assert (rows[0, 1:] == 3).all() and (rows[1, :-1] == 3).all()  # nobody drew them: all spare
    assert slot_rows(ops, capacity=1) is None  # two samples drew the same op in slot 0
    assert default_capacity(128) == 16 and default_capacity(256) == 32
    assert default_capacity(6) == 6 and default_capacity(20) == 8


def test_the_fixed_ops_read_nothing_back_from_the_device():
    """What a CUDA graph capture needs: no host read of a device value (`.item()`, a data-sized output).
    On the meta device tensors have no values, so any such read fails here."""
    _, ops, args = batch(16, 3, 6)
    images = torch.empty(16, 3, 40, 48, dtype=torch.uint8, device="meta")
    out = apply_photometric_fixed(images, pack_slots(ops, args).to("meta"), slot_rows(ops, 8).to("meta"))
    assert out.shape == images.shape and out.dtype == torch.uint8


def test_the_row_capacity_doubles_when_batches_keep_overflowing_it():
    sharp = OPS.index(ROW_OPS[-1])
    calm = np.full((64, 2), -1)
    calm[:3, 0] = sharp  # 3 rows: fits the starting capacity (8)
    busy = calm.copy()
    busy[:12, 0] = sharp  # 12 rows: overflows it
    cap = RowCapacity()
    for i in range(GROW_AFTER - 1):  # 1 in 19 overflows: not enough to grow
        assert (cap.rows(busy if i == 0 else calm, 64) is None) == (i == 0) and not cap.grew
    assert cap.capacity == 8
    assert cap.rows(busy, 64) is None and cap.grew and cap.capacity == 16  # 2 in 20 > 5 %: doubled
    rows = cap.rows(busy, 64)
    assert not cap.grew and rows is not None and rows.shape == (2, len(ROW_OPS), 16)
    small = RowCapacity(capacity=4)
    for _ in range(GROW_AFTER):
        small.rows(busy[:6], 6)
    assert small.capacity == 6  # never more rows than the batch


def test_pack_slots_refuses_bad_arrays():
    with pytest.raises(ValueError, match=r"must both be \(B, S\)"):
        pack_slots(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"photo_ops must lie in \[-1, 9\], got 0..10"):
        pack_slots(np.array([[0, 10]]), np.zeros((1, 2)))


def test_the_graph_wrapper_takes_the_grouped_ops_on_a_cpu():
    images, ops, args = batch(6, 2, 4)
    graph = PhotometricGraph()
    assert torch.equal(graph(images, ops, args), apply_photometric(images, ops, args))
    assert graph.failed is None


@cuda
def test_the_graph_replays_new_batches_and_other_shapes_take_the_grouped_ops():
    graph = PhotometricGraph()
    for seed in range(3):  # the capture, then replays with other images and slots
        images, ops, args = batch(16, 3, 10 + seed)
        images = images.cuda()
        got = graph(images, ops, args).clone()
        torch.testing.assert_close(got, apply_photometric(images, ops, args), atol=1, rtol=0)
    assert graph.captured and graph.failed is None and graph.fallbacks == 0
    images, ops, args = batch(10, 3, 20)  # a last, smaller batch: not the captured shape
    images = images.cuda()
    assert torch.equal(graph(images, ops, args), apply_photometric(images, ops, args))
    images, ops, args = batch(16, 3, 21)  # every sample draws Sharpness in slot 0: more than the capacity
    ops[:, 0] = OPS.index(ROW_OPS[-1])
    images = images.cuda()
    torch.testing.assert_close(graph(images, ops, args), apply_photometric(images, ops, args), atol=1, rtol=0)
    assert graph.fallbacks == 2


def test_the_bench_says_how_the_photometric_ops_ran():
    from types import SimpleNamespace as NS

    from trainer.bench import _describe_photometric

    def graph(captured=False, fallbacks=0, failed=None):
        return NS(captured=captured, fallbacks=fallbacks, failed=failed, rows=NS(capacity=16))

    assert _describe_photometric(graph(), on_device=False) == ""
    assert "launched op by op (no CUDA graph)" in _describe_photometric(graph(), on_device=True)
    line = _describe_photometric(graph(True, 3), True)
    assert "one CUDA graph per batch" in line and "16 rows per op and slot); 3 batch(es) took the grouped ops" in line
    assert "capture failed" in _describe_photometric(graph(True, failed="RuntimeError: x"), True)


@cuda
def test_the_training_targets_are_the_same_with_and_without_the_graph():
    """TargetBuilder on a real device-path batch: the graphed and the grouped photometric ops give the same
    normalised images (within one grey level: cuDNN may pick another Sharpness convolution per batch size)."""
    from test_hot_loop_sync import _batch, _builder  # tests/ is on the path (pytest prepend mode)

    batch, spec = _batch(pin=True)
    graphed, grouped = _builder(spec, "cuda"), _builder(spec, "cuda")
    grouped.photometric.graphed = False
    for step in range(3):
        torch.manual_seed(step)  # the erasing's noise comes from the global generator (the loop seeds it per step)
        a, cls_a, tok_a = graphed(batch, step=step)
        torch.manual_seed(step)
        b, cls_b, tok_b = grouped(batch, step=step)
        torch.testing.assert_close(a, b, atol=1.1 / 255 / 0.224, rtol=0)
        torch.testing.assert_close(cls_a, cls_b)
        torch.testing.assert_close(tok_a, tok_b)
    assert graphed.photometric.captured and not grouped.photometric.captured
