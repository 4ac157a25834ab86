"""Common image corruptions at 5 severities, for a small ImageNet-C-style robustness score on the demo data.

Severity tables follow the spirit of ImageNet-C (Hendrycks & Dietterich 2019); the blur and pixelate
strengths are scaled with the image side because the demo images are 64-96 px, not 224 px.
Every function maps (uint8 HWC image, severity 1..5, numpy Generator) -> uint8 HWC image of the same size.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

CorruptFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
SEVERITIES = (1, 2, 3, 4, 5)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def gaussian_noise(img, severity, rng):
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return _to_u8(img / 255.0 + rng.normal(0.0, sigma, img.shape))


def shot_noise(img, severity, rng):
    photons = (60, 25, 12, 5, 3)[severity - 1]
    return _to_u8(rng.poisson(img / 255.0 * photons) / photons)


def impulse_noise(img, severity, rng):
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    out = img.copy()
    hit = rng.random(img.shape) < amount
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255).astype(np.uint8)
    return out


def gaussian_blur(img, severity, rng):
    radius = (0.5, 0.75, 1.0, 1.5, 2.0)[severity - 1] * img.shape[0] / 64.0
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def contrast(img, severity, rng):
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = img / 255.0
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_u8((x - mean) * c + mean)


def brightness(img, severity, rng):
    # ImageNet-C adds to the HSV value channel.
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    hsv = np.asarray(Image.fromarray(img).convert("HSV")).astype(np.int16)
    hsv[..., 2] = np.clip(hsv[..., 2] + int(round(c * 255)), 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def jpeg_compression(img, severity, rng):
    quality = (25, 18, 15, 10, 7)[severity - 1]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def pixelate(img, severity, rng):
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


CORRUPTIONS: dict[str, CorruptFn] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur, "contrast": contrast, "brightness": brightness,
    "jpeg_compression": jpeg_compression, "pixelate": pixelate,
}


def corrupt(img: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply corruption `name` at `severity` (1..5) to a uint8 HWC RGB image."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be in 1..5, got {severity}")
    return CORRUPTIONS[name](img, severity, rng)
