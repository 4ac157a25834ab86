"""Token foreground quality of a trained model on masked images (the demo's val split).

The model sees each whole image resized to its input size (no crop, so the ground-truth mask stays aligned);
a token counts as foreground when its top-1 class is the image class, and is compared with the object
mask pooled to the token grid (≥ half the token's pixels on the object), as in `stl-labels report`.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from labelstore import decode_image
from labelstore.masks import decode_mask
from pipelines.report.numbers import FOREGROUND_SHARE
from pipelines.report.stats import foreground_scores, pool_mask_to_grid


def token_predictions(model, images: np.ndarray, mean, std, grid: tuple[int, int], batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(token top-1 (N, gh*gw), class top-1 (N,)) of `model` on uint8 images (N, h, w, 3) at their size."""
    model.eval()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    tok, cls = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i:i + batch_size]).permute(0, 3, 1, 2).float()
            c, t = model.forward_tokens((x - mean_t) / std_t)
            if t.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"model gave {t.shape[1]} tokens, expected grid {grid}")
            tok.append(t.argmax(-1).numpy())
            cls.append(c.argmax(-1).numpy())
    return np.concatenate(tok), np.concatenate(cls)


def token_foreground_quality(token_top1: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                             grid: tuple[int, int], object_value: int = 1) -> dict:
    """Foreground scores of "token top-1 == image class" against masks (N, H, W) pooled to `grid`."""
    truth = pool_mask_to_grid(masks, grid, object_value).reshape(len(masks), -1) >= FOREGROUND_SHARE
    pred = token_top1 == np.asarray(labels)[:, None]
    return {**foreground_scores(pred, truth), "token_top1_is_class": float(pred.mean()),
            "object_token_share": float(truth.mean())}


def load_masked_split(urls: Iterable[str], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, h, w, 3) uint8 resized to `size`, labels (N,), masks (N, H, W)) of demo-data shards."""
    images, labels, masks = [], [], []
    for s in wds.WebDataset(list(urls), shardshuffle=False, empty_check=False):
        img = decode_image(s["jpg"], f"{s['__key__']}.jpg")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        images.append(np.asarray(img))
        labels.append(int(s["cls"]))
        masks.append(decode_mask(s["mask"], f"{s['__key__']}.mask"))
    return np.stack(images), np.array(labels), np.stack(masks)
