"""The one image decode path shared by the labeler and the trainer.

Both sides must see identical pixels for a view to be replayed exactly, so every mode conversion
(grayscale, palette, CMYK, alpha, 16-bit) happens here and nowhere else. No EXIF transpose, no JPEG
draft decoding: timm/webdataset do neither, and skipping both keeps the decode independent of caller.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import ImageDecodeError

# ImageNet mean in 8-bit: where an image is transparent (and where a view leaves the image) we show
# the dataset mean, the least informative colour for a classifier.
DEFAULT_FILL = (124, 116, 104)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _composite(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, tuple(fill))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    # 16-bit grey (and Pillow's 32-bit "I" holding 16-bit PNG data): rescale 0..65535 → 0..255, rounded.
    v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((v + 128) // 257).astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image | np.ndarray, fill: tuple[int, int, int] = DEFAULT_FILL) -> Image.Image:
    """Return `img` as an 8-bit RGB PIL image (alpha composited on `fill`)."""
    if isinstance(img, np.ndarray):
        return _array_to_rgb(img, fill)
    if not isinstance(img, Image.Image):
        raise TypeError(f"to_rgb expects a PIL.Image or a uint8 array, got {type(img).__name__}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _composite(img, fill)
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_to_eight(img)
    if mode == "F":
        v = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(v, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _array_to_rgb(a: np.ndarray, fill: tuple[int, int, int]) -> Image.Image:
    if a.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W[, C]); got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L").convert("RGB")
    if a.ndim == 3 and a.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(a), "RGB")
    if a.ndim == 3 and a.shape[2] == 4:
        return _composite(Image.fromarray(np.ascontiguousarray(a), "RGBA"), fill)
    raise TypeError(f"image arrays must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.shape}")


def decode_image(data: bytes, name: str = "", fill: tuple[int, int, int] = DEFAULT_FILL) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) to a fully loaded RGB image.

    Raises ImageDecodeError naming `name` (e.g. "shard-000003.tar:k0042.jpg") for anything Pillow
    cannot read, including truncated files and decompression bombs.
    """
    label = name or "<image bytes>"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"{label}: expected encoded image bytes, got {type(data).__name__}")
    try:
        # Not `with Image.open(...)`: closing an image frees its pixels, so an RGB one (most JPEGs) would need a
        # copy of every pixel to outlive the block. Loaded, it no longer reads the in-memory file.
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
        return to_rgb(img, fill)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, TypeError) as e:
        raise ImageDecodeError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e
