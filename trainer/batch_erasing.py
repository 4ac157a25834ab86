"""timm's random erasing for a whole batch on a GPU: the same boxes, a few kernels instead of a loop.

timm's `RandomErasing` erases a batch image by image: per erased image a slice, a random fill and a slice
assignment, each its own kernel launch from Python (260–300 calls for a batch of 128 at the paper's
probability 0.25). A training step that is host-bound spends that time issuing them. `BatchRandomErasing`
keeps timm's settings and its box draws (the same `random` calls in the same order, so a seeded run
erases the same boxes as timm's loop) and applies every box of the batch at once: one upload of the boxes,
one mask, one fill draw, one select. Only the fill values' random stream differs from the loop's (same
distribution: zeros, one normal colour per box, or normal noise per pixel).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing  # not exported by timm.data

from labeler.device import to_device


class BatchRandomErasing(RandomErasing):
    """`timm.data.random_erasing.RandomErasing` (same arguments and boxes) applied to a (B, C, H, W) batch in a
    few batched ops; it returns the erased batch as a new tensor. A single (C, H, W) image goes to timm's."""

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4:
            return super().__call__(input)
        b, c, h, w = input.shape
        boxes = np.zeros((b, self.max_count, 4), np.int64)  # per image and box: top, left, height, width
        first = b // self.num_splits if self.num_splits > 1 else 0  # timm leaves the first split clean
        for i in range(first, b):
            self.draw_boxes(boxes[i], h, w)
        if not (boxes[..., 2] * boxes[..., 3]).any():
            return input
        box = to_device(boxes, input.device)  # page-locked, queued: no wait on the device
        top, left, bh, bw = (box[..., j, None, None] for j in range(4))  # each (B, K, 1, 1)
        ys = torch.arange(h, device=input.device).view(1, 1, h, 1)
        xs = torch.arange(w, device=input.device).view(1, 1, 1, w)
        inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)  # (B, K, H, W)
        if self.per_pixel:
            noise = torch.empty_like(input).normal_()
            return torch.where(inside.any(1)[:, None], noise, input)
        if not self.rand_color:
            return input.masked_fill(inside.any(1)[:, None], 0.0)
        colours = torch.empty((b, self.max_count, c, 1, 1), dtype=input.dtype, device=input.device).normal_()
        out = input
        for k in range(self.max_count):  # in timm's order: where boxes overlap, the later one is on top
            out = torch.where(inside[:, k, None], colours[:, k], out)
        return out

    def draw_boxes(self, out: np.ndarray, img_h: int, img_w: int) -> None:
        """One image's boxes into `out` (max_count, 4), by timm's `_erase` draws in its order: erase with
        `probability`, a box count, then per box up to 10 tries of area and log-aspect until it fits, then its
        top and left. A box that never fit (or has no area) stays all zero: nothing erased."""
        if random.random() > self.probability:
            return
        area = img_h * img_w
        count = self.min_count if self.min_count == self.max_count else random.randint(self.min_count, self.max_count)
        for k in range(count):
            for _ in range(10):
                target_area = random.uniform(self.min_area, self.max_area) * area / count
                aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < img_w and h < img_h:
                    out[k] = (random.randint(0, img_h - h), random.randint(0, img_w - w), h, w)
                    break
