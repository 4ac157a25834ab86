"""The optional `mask` field of a shard sample: a single-channel PNG, one value per pixel.

The demo dataset writes it; `stl-labels report --masks` measures token labels against it, after
rendering it through a stored view with `labelstore.render_mask`.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

MASK_BACKGROUND, MASK_OBJECT, MASK_DISTRACTOR = 0, 1, 2  # background, object of the image class, distractor


def encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, "PNG")
    return buf.getvalue()


def decode_mask(data: bytes, name: str = "") -> np.ndarray:
    """PNG mask bytes -> (H, W) uint8; a clear error naming `name` if it is not a single-channel PNG."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # Pillow raises several types for bad data
        raise ValueError(f"mask {name or '<bytes>'}: not a readable PNG ({exc})") from exc
    if img.mode not in ("L", "P", "1"):
        raise ValueError(f"mask {name or '<bytes>'}: expected a single-channel PNG, got mode {img.mode}")
    return np.asarray(img.convert("L") if img.mode == "1" else img, dtype=np.uint8)
