"""The device-path step's host side never waits on the device: TargetBuilder on a packed, pinned batch of
footprint regions (box-reduced views, every photometric op, erasing, mixing, token targets) under
`torch.cuda.set_sync_debug_mode("error")`. On a machine without CUDA the same batch runs on the CPU, so
the harness itself is checked everywhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labeler.flat_images import pack_flat
from labeler.render_batch import source_footprint
from labelstore.views import ViewSpec, draw_views
from trainer.data_config import DataConfig, TokenLabelConfig
from trainer.photometric import PHOTOMETRIC_OPS
from trainer.target_builder import TargetBuilder

B, C, K, GRID, SIZE = 8, 10, 3, (4, 4), (32, 32)


def _batch(pin: bool) -> dict:
    rng = np.random.default_rng(0)
    spec = ViewSpec(size=SIZE, scale=(0.3, 1.0))  # large crops of 60–200 px images: k >= 2 views too
    images = [rng.integers(0, 256, (int(rng.integers(60, 200)), int(rng.integers(60, 200)), 3), np.uint8)
              for _ in range(B)]
    params = np.stack([draw_views(spec, 3, i, 1, im.shape[:2])[0] for i, im in enumerate(images)])
    hw = np.array([im.shape[:2] for im in images])
    foot = source_footprint(params, hw)
    flat = pack_flat([im[y0:y1, x0:x1] for im, (y0, x0, y1, x1) in zip(images, foot)])
    ops = np.stack([np.arange(B) % len(PHOTOMETRIC_OPS), (np.arange(B) + 3) % len(PHOTOMETRIC_OPS)], 1)
    args = np.tile(np.array([[1.5, 4.0]], np.float32), (B, 1))
    args[ops == PHOTOMETRIC_OPS.index("SolarizeIncreasing")] = 128.0
    batch = {"source": flat, "source_hw": torch.from_numpy(hw), "source_origin": torch.from_numpy(foot[:, :2]),
             "params": torch.from_numpy(params), "photo_ops": torch.from_numpy(ops.astype(np.int8)),
             "photo_args": torch.from_numpy(args), "label": torch.arange(B) % C,
             "token_logit": torch.randn(B, GRID[0] * GRID[1], K).half(),
             "token_class": torch.from_numpy(np.stack([rng.permutation(C)[:K] for _ in range(B * 16)])
                                             .reshape(B, 16, K).astype(np.int16)),
             "token_tail": torch.randn(B, 16).half()}
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch, spec


def _builder(spec, device) -> TargetBuilder:
    data = DataConfig(shards=("unused",), reprob=1.0, mixup=0.8, cutmix=1.0, mix_prob=1.0)
    return TargetBuilder(num_classes=C, data=data, tokens=TokenLabelConfig(), store_grid=GRID, device=device,
                         view_spec=spec)


def test_the_step_inputs_build_on_the_cpu():
    batch, spec = _batch(pin=False)
    images, cls_target, token_target = _builder(spec, "cpu")(batch, step=1)
    assert images.shape == (B, 3, *SIZE) and cls_target.shape == (B, C) and token_target.shape == (B, 16, C)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_step_inputs_build_without_a_host_sync_on_cuda():
    batch, spec = _batch(pin=True)
    builder = _builder(spec, "cuda")
    builder(batch, step=0)  # first calls: CUDA context, generators, allocator pools
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            images, cls_target, token_target = builder(batch, step=step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(images).all() and torch.isfinite(token_target).all()
