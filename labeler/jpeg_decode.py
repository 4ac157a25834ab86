"""Encoded image bytes → the RGB pixels of `labelstore.decode_image`, in about a fifth less time for JPEGs.

Pillow and torchvision both decode JPEGs with libjpeg-turbo (integer IDCT, smooth chroma upsampling), but
torchvision writes RGB straight into the output array, where Pillow unpacks every row into its own
four-byte layout and then copies it out for numpy. Exact replay needs the very pixels the teacher saw, so
the faster decoder is only used in a process where it decoded a set of probe JPEGs (every chroma
subsampling, progressive, grey, odd sizes) to exactly Pillow's pixels; that is checked once per process, at
first use. Everything else goes through `labelstore.decode_image`: other formats, CMYK/YCCK JPEGs (Pillow
has its own colour conversion), and any JPEG torchvision refuses, so a bad file gets Pillow's error with
its name.

torchvision deprecated its image decoders in 0.29 in favour of TorchCodec; where a torchvision lacks them,
every image goes through Pillow.
"""
from __future__ import annotations

import io
import logging
import warnings
from functools import cache

import numpy as np
import torch
from PIL import Image

from labelstore import decode_image
from labelstore.images import DEFAULT_FILL

log = logging.getLogger(__name__)

# Only the deprecation notice every call of torchvision's decoder raises; the decode itself is unchanged.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_PLAIN_MODES = ("RGB", "L")  # JPEG colour spaces whose RGB output both decoders define the same way


def decode_rgb(data: bytes, name: str = "", fill: tuple[int, int, int] = DEFAULT_FILL) -> np.ndarray:
    """(H, W, 3) uint8, C-contiguous: `np.asarray(labelstore.decode_image(data, name, fill))`, pixel for pixel.

    Raises `labelstore.ImageDecodeError` naming `name` for anything that cannot be decoded."""
    fast = _fast_decoder()
    if fast is not None and plain_jpeg_hw(data) is not None:
        try:
            return fast(data)
        except RuntimeError:  # torchvision refuses it (truncated, corrupt): Pillow decides, and names the file
            pass
    return np.asarray(decode_image(data, name, fill))


def fast_jpeg_decoder_in_use() -> bool:
    """Whether this process decodes plain JPEGs with torchvision (it reproduced Pillow's pixels exactly)."""
    return _fast_decoder() is not None


def jpeg_decoder_name() -> str:
    """What `decode_rgb` decodes plain JPEGs with in this process (the benches print it with their figures)."""
    return "torchvision (Pillow's pixels)" if fast_jpeg_decoder_in_use() else "Pillow"


def plain_jpeg_hw(data: bytes) -> tuple[int, int] | None:
    """(h, w) of an RGB or grey JPEG, which libjpeg-based decoders (torchvision's, nvJPEG) turn into RGB as
    Pillow does; None for anything else. Reads the header only, with Pillow's decompression-bomb limit."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in _PLAIN_MODES:
                return img.height, img.width
    except Exception:  # noqa: BLE001 - unreadable header: decode_image reports it with the file's name
        return None
    return None


@cache
def _fast_decoder():
    """torchvision's CPU JPEG decoder as bytes → HWC array, or None where it is missing or differs from Pillow."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(data: bytes) -> np.ndarray:
        chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return chw.permute(1, 2, 0).contiguous().numpy()  # torchvision's CHW is a view of HWC rows: no copy

    for label, data in probe_jpegs():
        try:
            same = np.array_equal(decode(data), np.asarray(decode_image(data, label)))
        except Exception as e:  # noqa: BLE001 - a decoder that fails a probe is not used at all
            log.warning("JPEG decoding stays with Pillow: torchvision failed on the probe %s (%s)", label, e)
            return None
        if not same:
            log.warning("JPEG decoding stays with Pillow: torchvision's pixels differ from Pillow's on the probe "
                        "%s (different libjpeg builds)", label)
            return None
    return decode


def probe_jpegs() -> list[tuple[str, bytes]]:
    """(label, JPEG bytes): smooth gradients with noise, saved by Pillow in every layout a dataset has."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((37, 53), (64, 80)):  # odd sizes: partial MCUs at the right and bottom edges
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1)
        rgb = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
        for subsampling, name in ((0, "4:4:4"), (1, "4:2:2"), (2, "4:2:0")):
            for progressive in (False, True):
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
                out.append((f"{h}x{w} {name}{' progressive' if progressive else ''}", buf.getvalue()))
        buf = io.BytesIO()
        Image.fromarray(rgb[:, :, 0], "L").save(buf, "JPEG", quality=90)
        out.append((f"{h}x{w} grey", buf.getvalue()))
    return out
