"""Images of different sizes in one flat host buffer: how decoded pixels travel to the render device.

A zero-padded (N, H, W, 3) batch of 300–640 px images is about twice the bytes of the images
themselves (every image padded to the batch's largest side), and every byte is copied several times
on its way to the device: into shared memory by a data worker, into page-locked memory, over PCIe.
`FlatImages` keeps only the images' own bytes, back to back; `upload_flat` copies that one buffer
to the device and lays the images out there as the padded `SourceBatch` the renderer reads (on a GPU
one gather for the whole batch, `gather_padded`; on a CPU one copy per image). `pack_flat(shared=True)`
writes straight into shared memory, so a DataLoader worker or decode process hands the batch over
without another copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from labeler.device import to_device
from labeler.render_batch import SourceBatch, render_batch
from labelstore.views import ViewSpec


@dataclass(frozen=True)
class FlatImages:
    """N HWC uint8 RGB images back to back in `data` (1-D uint8 tensor); `hw` (N, 2) int64 their sizes."""

    data: torch.Tensor
    hw: np.ndarray

    def __post_init__(self) -> None:
        hw = np.asarray(self.hw, dtype=np.int64).reshape(-1, 2)
        if self.data.dtype != torch.uint8 or self.data.ndim != 1:
            raise ValueError(f"FlatImages.data must be a 1-D uint8 tensor, got {tuple(self.data.shape)} {self.data.dtype}")
        if hw.size and hw.min() < 1:
            raise ValueError(f"FlatImages.hw has an empty image: {hw.tolist()}")
        need = int((hw[:, 0] * hw[:, 1]).sum() * 3)
        if need != self.data.numel():
            raise ValueError(f"FlatImages: sizes {hw.tolist()} need {need} bytes, data has {self.data.numel()}")
        object.__setattr__(self, "hw", hw)

    def __len__(self) -> int:
        return len(self.hw)

    @property
    def offsets(self) -> np.ndarray:
        """(N + 1,) byte offsets: image i is data[offsets[i]:offsets[i + 1]]."""
        return np.concatenate([[0], np.cumsum(self.hw[:, 0] * self.hw[:, 1] * 3)]).astype(np.int64)

    def image(self, i: int) -> np.ndarray:
        """Image i as an (h, w, 3) numpy view (host data only)."""
        off, (h, w) = self.offsets[i], self.hw[i]
        return self.data[int(off):int(off) + int(h * w * 3)].numpy().reshape(int(h), int(w), 3)

    def slice(self, start: int, stop: int) -> "FlatImages":
        """Images start..stop-1 (a view of the same bytes)."""
        off = self.offsets
        return FlatImages(self.data[int(off[start]):int(off[stop])], self.hw[start:stop])

    def pin_memory(self) -> "FlatImages":
        """Page-locked copy (torch's DataLoader calls this on batch items when `pin_memory=True`)."""
        return FlatImages(self.data.pin_memory(), self.hw)


def shared_bytes(nbytes: int) -> torch.Tensor:
    """A 1-D uint8 tensor allocated in shared memory (`share_memory_()` on a fresh tensor would allocate twice
    and copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(int(nbytes)))


def pack_flat(images: Sequence[np.ndarray], *, pin_memory: bool = False, shared: bool = False) -> FlatImages:
    """HWC uint8 RGB images → one FlatImages (page-locked with `pin_memory`, in shared memory with `shared`)."""
    if pin_memory and shared:
        raise ValueError("pack_flat: pin_memory and shared exclude each other (pin in the receiving process)")
    for i, im in enumerate(images):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"image {i}: expected HWC uint8 RGB, got {im.shape} {im.dtype}")
    hw = np.array([im.shape[:2] for im in images], dtype=np.int64).reshape(-1, 2)
    total = int((hw[:, 0] * hw[:, 1]).sum() * 3)
    # In shared memory from the start: handing it to another process copies nothing.
    data = shared_bytes(total) if shared else torch.empty(total, dtype=torch.uint8, pin_memory=pin_memory)
    out, off = data.numpy(), 0
    for im in images:
        out[off:off + im.size] = im.reshape(-1)
        off += im.size
    return FlatImages(data, hw)


def upload_flat(flat: FlatImages | Sequence[FlatImages], device: torch.device | str, multiple: int = 32, *,
                image_hw: np.ndarray | None = None, origins: np.ndarray | None = None) -> SourceBatch:
    """FlatImages → SourceBatch on `device`: one (non-blocking when pinned) copy of the bytes, then each
    image into its corner of a zeroed (N, 3, H, W) buffer (sides rounded up to `multiple`).

    Several FlatImages (a forward batch made of pieces of decoded chunks) are copied one by one into their
    places of one device buffer: no host-side concatenation, so a caller whose pieces are already
    page-locked spends no host copy on the batch at all (the labeling work unit pins each chunk as it
    arrives, off its device loop).

    When the flat images are regions of larger images (`labeler.render_batch.source_footprint`), give the
    whole images' sizes `image_hw` (N, 2) and the regions' `origins` (N, 2) (y0, x0)."""
    parts = [flat] if isinstance(flat, FlatImages) else list(flat)
    if not sum(len(p) for p in parts):
        raise ValueError("upload_flat needs at least one image")
    if image_hw is None and origins is not None:
        raise ValueError("upload_flat: origins of regions need the whole images' sizes (image_hw) too")
    device = torch.device(device)
    hw = np.concatenate([p.hw for p in parts])
    if device.type == "cuda":
        pixels = gather_padded(_upload_parts(parts, device, spare=3), hw, multiple)
    else:
        data = parts[0].data if len(parts) == 1 else _upload_parts(parts, device)
        offsets = np.concatenate([[0], np.cumsum(hw[:, 0] * hw[:, 1] * 3)]).astype(np.int64)
        pixels = pad_images([data[off:off + ih * iw * 3].view(ih, iw, 3)
                             for off, (ih, iw) in zip(offsets[:-1].tolist(), hw.tolist())], multiple)
    return SourceBatch(pixels=pixels, hw=hw if image_hw is None else image_hw, origins=origins, region_hw=hw)


def _upload_parts(parts: Sequence[FlatImages], device: torch.device, spare: int = 0) -> torch.Tensor:
    """The parts' bytes back to back in one 1-D device tensor, then `spare` zero bytes: one copy per part
    (non-blocking from page-locked memory; a pageable part is page-locked first, as `to_device` does, so no
    copy waits)."""
    total = sum(p.data.numel() for p in parts)
    data = torch.empty(total + spare, dtype=torch.uint8, device=device)
    off = 0
    for p in parts:
        n = p.data.numel()
        src = p.data if device.type != "cuda" or p.data.is_pinned() else p.data.pin_memory()
        data[off:off + n].copy_(src, non_blocking=True)
        off += n
    if spare:
        data[total:].zero_()
    return data


def _padded_hw(hw: np.ndarray, multiple: int) -> tuple[int, int]:
    return (-(-int(hw[:, 0].max()) // multiple) * multiple, -(-int(hw[:, 1].max()) // multiple) * multiple)


def gather_padded(data: torch.Tensor, hw: np.ndarray, multiple: int = 32) -> torch.Tensor:
    """Flat HWC images (`data`: their bytes back to back, then one zero pixel) → the (N, 3, H, W) batch of
    `pad_images`, in one gather on the data's device: a handful of kernels whatever N (a per-image copy
    loop issues N small copies, which on a GPU is launch-bound: 128 images per student step)."""
    hw = np.asarray(hw, np.int64).reshape(-1, 2)
    n_pixels = int((hw[:, 0] * hw[:, 1]).sum())
    if data.numel() != 3 * (n_pixels + 1):
        raise ValueError(f"gather_padded: sizes {hw.tolist()} need {3 * n_pixels} bytes and a zero pixel, "
                         f"data has {data.numel()}")
    h, w = _padded_hw(hw, multiple)
    starts = np.concatenate([[0], np.cumsum(hw[:, 0] * hw[:, 1])[:-1]])
    # int32 indices (half the bytes of int64) while every pixel index fits.
    index_dtype = torch.int32 if n_pixels < 2**31 else torch.int64
    meta = to_device(np.stack([starts, hw[:, 0], hw[:, 1]], 1).astype(np.int64), data.device).to(index_dtype)
    start, ih, iw = (meta[:, i, None, None] for i in range(3))
    ys = torch.arange(h, device=data.device, dtype=index_dtype)[None, :, None]
    xs = torch.arange(w, device=data.device, dtype=index_dtype)[None, None, :]
    # Pixel (y, x) of image i, or the trailing zero pixel outside the image.
    index = torch.where((ys < ih) & (xs < iw), start + ys * iw + xs, n_pixels)
    pixels = torch.index_select(data.view(-1, 3), 0, index.reshape(-1))
    return pixels.view(len(hw), h, w, 3).permute(0, 3, 1, 2)


def pad_images(images: Sequence[torch.Tensor], multiple: int = 32) -> torch.Tensor:
    """HWC uint8 images (on one device) → (N, 3, H, W): each in the top-left corner of a zeroed buffer whose
    sides are the largest image's, rounded up to `multiple` (few distinct shapes for the renderer)."""
    h, w = _padded_hw(np.array([im.shape[:2] for im in images], np.int64), multiple)
    pixels = torch.zeros((len(images), h, w, 3), dtype=torch.uint8, device=images[0].device)
    for i, im in enumerate(images):
        pixels[i, :im.shape[0], :im.shape[1]] = im
    return pixels.permute(0, 3, 1, 2)


def render_images(images: Sequence[np.ndarray], params: Sequence[np.ndarray], spec: ViewSpec,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Convenience: HWC uint8 images and per-image params (S_i, P) → all views (ΣS_i, 3, h, w) uint8."""
    counts = [len(np.asarray(p).reshape(-1, params[0].shape[-1])) for p in params]
    index = np.repeat(np.arange(len(images)), counts)
    return render_batch(upload_flat(pack_flat(images), device), index, np.concatenate([np.asarray(p) for p in params]),
                        spec)
