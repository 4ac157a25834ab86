"""A forward batch's images decoded on the GPU (`decode_device: cuda`), for the labeling work unit.

In chunk mode "jpeg" the decode workers keep the bytes of the JPEGs nvJPEG decodes as Pillow would (baseline,
RGB or grey) and decode the other images themselves. Here the batch's JPEGs go to
`torchvision.io.decode_jpeg` in one call and the others are uploaded as they came. A JPEG nvJPEG refuses, or
decodes to another size than its header gave, is decoded by Pillow instead (the decode the trainer
replays); one Pillow cannot decode either is reported back with Pillow's reason (its shard files it as an
invalid row) and a blank image of its header's size keeps the batch's shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labeler.decode_chunks import DecodedChunk
from labeler.device import to_device
from labeler.flat_images import pad_images
from labeler.render_batch import SourceBatch
from labelstore import ImageDecodeError, decode_image


@dataclass(frozen=True)
class BatchImage:
    """One image of a forward batch: its JPEG bytes (decoded on the device) or its decoded host pixels."""

    hw: tuple[int, int]  # (height, width) from the JPEG header, or of the decoded pixels
    name: str  # "<shard url>:<member>", named in errors
    jpeg: bytes | None = None
    pixels: np.ndarray | None = None  # (h, w, 3) uint8

    def __post_init__(self) -> None:
        if (self.jpeg is None) == (self.pixels is None):
            raise ValueError(f"BatchImage {self.name}: give either its JPEG bytes or its pixels")


def chunk_images(chunk: DecodedChunk, a: int, b: int, url: str) -> list[BatchImage]:
    """Valid images a..b-1 of a mode-"jpeg" chunk, in order: `chunk.jpegs` holds the JPEGs kept for the
    device, `chunk.pixels` the images decoded on the host, `chunk.jpeg_rows` says which valid row is which."""
    mask = chunk.jpeg_rows
    jpeg_at, pixel_at = np.cumsum(mask) - 1, np.cumsum(~mask) - 1
    valid_rows = np.flatnonzero(chunk.valid_mask)
    out = []
    for j in range(a, b):
        hw = tuple(int(v) for v in chunk.valid_hw[j])
        name = f"{url}:{chunk.names[int(valid_rows[j])]}"
        out.append(BatchImage(hw, name, jpeg=chunk.jpegs[jpeg_at[j]]) if mask[j]
                   else BatchImage(hw, name, pixels=chunk.pixels.image(int(pixel_at[j]))))
    return out


def decode_on_device(images: list[BatchImage], device: torch.device,
                     batch_images: int) -> tuple[SourceBatch, list[tuple[int, str]]]:
    """The images on `device` as one padded SourceBatch, repeated from the last to `batch_images` (one shape for
    the compiled forward), and the (index, reason) of each image neither nvJPEG nor Pillow could decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not images:
        raise ValueError("decode_on_device needs at least one image")
    jpegs = [torch.frombuffer(bytearray(im.jpeg), dtype=torch.uint8) for im in images if im.jpeg is not None]
    try:
        decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
    except RuntimeError:  # some JPEG of the batch: decode each on its own (None = refused, Pillow below)
        decoded = iter([_decode_one(decode_jpeg, data, ImageReadMode.RGB, device) for data in jpegs])
    out: list[torch.Tensor] = []  # (h, w, 3) uint8 on the device, in batch order
    failed: list[tuple[int, str]] = []
    for i, im in enumerate(images):
        if im.jpeg is None:
            # No host copy first: to_device page-locks (copies) on CUDA, and pad_images copies at once.
            out.append(to_device(im.pixels, device))
            continue
        image = next(decoded)
        if image is not None and tuple(image.shape[1:]) == im.hw:
            out.append(image.permute(1, 2, 0))
            continue
        try:
            out.append(pillow_decode(im, device))
        except ImageDecodeError as e:
            failed.append((i, str(e)))
            out.append(torch.zeros((*im.hw, 3), dtype=torch.uint8, device=device))
    out += [out[-1]] * (batch_images - len(out))
    return SourceBatch(pad_images(out), np.array([im.shape[:2] for im in out], np.int64)), failed


def pillow_decode(image: BatchImage, device: torch.device) -> torch.Tensor:
    """A JPEG nvJPEG refused, decoded by Pillow (raises ImageDecodeError naming it if Pillow cannot either)."""
    pixels = np.asarray(decode_image(image.jpeg, image.name))
    return to_device(pixels, device)  # read-only pixels: to_device copies them once


def _decode_one(decode_jpeg, data: torch.Tensor, mode, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        return None
