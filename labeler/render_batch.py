"""Batched torch backend of `labelstore.render`: every view of a whole batch of images in one call.

Labeler and trainer both render through here on a GPU: the views of many images of different sizes
go through a handful of kernels per batch (no per-image Python loop issuing device work). The
geometry comes from `labelstore.views.view_geometry`, the one definition the Pillow reference uses
too; only the pixel arithmetic is re-done, matching Pillow's conventions (docs/design.md, "Views"):

* pixel i spans [i, i+1); a view's matrix maps output pixel centres to reduced-crop coordinates;
* bilinear, clamped to the reduced crop's edge pixels inside it, `fill` outside [0, w) × [0, h);
* the result is truncated (floor(x + eps)) as Pillow's bilinear does, not rounded;
* crops that shrink by k >= 2 are first box-reduced by k exactly as `Image.reduce(k, box)`:
  edge-clipped box sums, then `((sum + n // 2) * (2**24 // n)) >> 24`.

Views with k = 1 (most of them) sample the uploaded image directly through one `grid_sample`; views
with k >= 2 get their reduced crops from a summed-area table (4 gathers per reduced pixel, integer
exact) and a second `grid_sample`. Float64 arithmetic on the CPU keeps the reference exact; float32
on a GPU stays within the bound the tests pin (mean |Δ| <= 0.01, max |Δ| <= 1 grey level).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from labeler.device import to_device
from labelstore.views import ViewSpec, view_geometry

# Pillow truncates its bilinear result; a small epsilon absorbs float error on exact integers (without
# it, hflip + integer crops came out one level low in about a third of the pixels). float32 needs a
# larger one than float64 for the same reason.
_TRUNC_EPS = {torch.float64: 1e-6, torch.float32: 1e-3}


@dataclass(frozen=True)
class SourceBatch:
    """Decoded source images on the render device.

    pixels: (N, 3, H, W) uint8, image i's held region in its top-left `region_hw[i]` corner (the rest is
    never read); hw: (N, 2) int64 numpy array of the whole images' (height, width): the view geometry's;
    origins: (N, 2) int64 (y0, x0) of each held region in its image (default: zeros, the whole image);
    region_hw: (N, 2) int64 size of each held region (default: `hw`). A region need only cover the
    `source_footprint` of the views rendered from it; `render_batch` checks that it does.
    """

    pixels: torch.Tensor
    hw: np.ndarray
    origins: np.ndarray | None = None
    region_hw: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.ndim != 4 or self.pixels.shape[1] != 3:
            raise ValueError(f"SourceBatch.pixels must be uint8 (N, 3, H, W), got {tuple(self.pixels.shape)} "
                             f"{self.pixels.dtype}")
        hw = np.asarray(self.hw, dtype=np.int64).reshape(-1, 2)
        if hw.shape[0] != self.pixels.shape[0]:
            raise ValueError(f"SourceBatch.hw has {hw.shape[0]} sizes for {self.pixels.shape[0]} images")
        origins = np.zeros_like(hw) if self.origins is None else np.asarray(self.origins, np.int64).reshape(-1, 2)
        region = hw if self.region_hw is None else np.asarray(self.region_hw, np.int64).reshape(-1, 2)
        if origins.shape != hw.shape or region.shape != hw.shape:
            raise ValueError(f"SourceBatch.origins {origins.shape} / region_hw {region.shape} must be (N, 2) like hw "
                             f"{hw.shape}")
        if hw.size and hw.min() < 1:
            raise ValueError(f"SourceBatch.hw has an empty image: {hw.tolist()}")
        if hw.size and (region.min() < 1 or origins.min() < 0 or (origins + region > hw).any()):
            raise ValueError(f"SourceBatch regions (origins {origins.tolist()}, sizes {region.tolist()}) must lie "
                             f"inside their images {hw.tolist()}")
        if hw.size and (region[:, 0].max() > self.pixels.shape[2] or region[:, 1].max() > self.pixels.shape[3]):
            raise ValueError(f"SourceBatch region sizes {region.tolist()}: one does not fit the pixel buffer "
                             f"{tuple(self.pixels.shape)}")
        object.__setattr__(self, "hw", hw)
        object.__setattr__(self, "origins", origins)
        object.__setattr__(self, "region_hw", region)


# Bilinear sampling at a crop's last pixel centre touches the next pixel with weight 0 (and float rounding
# can put a sample a hair before the first one): one pixel around the crop box keeps those reads identical.
FOOTPRINT_MARGIN = 1


def source_footprint(params: np.ndarray, src_hw: np.ndarray, spec: ViewSpec) -> np.ndarray:
    """(N, 4) int64 (y0, x0, y1, x1): the part of each source image `render_batch` reads for view params (N, P)
    of images of sizes (N, 2) or (2,): the crop box plus `FOOTPRINT_MARGIN`, clipped to the image.

    A data worker that knows the view it replays sends only this region (with its origin): about half the
    bytes at RandomResizedCrop's mean area fraction, and the render is bit-identical to the whole image's.
    """
    params = np.asarray(params, np.float32).reshape(-1, np.asarray(params).shape[-1])
    return _footprint(view_geometry(params, src_hw, spec).boxes, src_hw)


def _footprint(boxes: np.ndarray, src_hw: np.ndarray) -> np.ndarray:
    hw = np.broadcast_to(np.asarray(src_hw, np.int64).reshape(-1, 2), (len(boxes), 2))
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    m = FOOTPRINT_MARGIN
    return np.stack([np.maximum(y0 - m, 0), np.maximum(x0 - m, 0),
                     np.minimum(y1 + m, hw[:, 0]), np.minimum(x1 + m, hw[:, 1])], 1)


def _float_dtype(device: torch.device) -> torch.dtype:
    # float64 is exact enough to reproduce Pillow's truncation almost everywhere; GPUs are slow at it.
    return torch.float64 if device.type == "cpu" else torch.float32


def _sample_coords(matrices: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-crop coords (u, v), each (V, h, w), of every output pixel centre under (V, 2, 3) matrices."""
    h, w = out_hw
    ys = torch.arange(h, device=matrices.device, dtype=matrices.dtype) + 0.5
    xs = torch.arange(w, device=matrices.device, dtype=matrices.dtype) + 0.5
    m = matrices[:, :, :, None, None]
    u = m[:, 0, 0] * xs[None, None, :] + m[:, 0, 1] * ys[None, :, None] + m[:, 0, 2]
    v = m[:, 1, 0] * xs[None, None, :] + m[:, 1, 1] * ys[None, :, None] + m[:, 1, 2]
    return u, v


def _normalized(pos: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel-index position (pixel i's centre at i) → grid_sample's [-1, 1] (align_corners=False)."""
    return (2.0 * pos + 1.0) / size - 1.0


def _reduced_crops(sources: SourceBatch, used: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                   factors: torch.Tensor, reduced_hw: torch.Tensor, max_hw: tuple[int, int]) -> torch.Tensor:
    """`Image.reduce(k, box)` of V crops at once → (V, 3, Hr, Wr) uint8 (padded by edge replication).

    used: the images the V views read; image_index: each view's position in `used`; max_hw: the largest
    reduced crop (Hr, Wr). All three come from the host: finding them here would wait on the device."""
    # Summed-area table (images used here only, H+1, W+1, 3): any box sum is 4 gathers, exact in int32
    # up to 8k × 8k images. Only the images of the k >= 2 views are summed (usually a few per batch).
    px = sources.pixels[used]
    n, _, hmax, wmax = px.shape
    sat = torch.zeros((n, hmax + 1, wmax + 1, 3), dtype=torch.int32, device=px.device)
    sat[:, 1:, 1:] = px.permute(0, 2, 3, 1).to(torch.int32).cumsum(1).cumsum(2)
    hr, wr = max_hw
    k = factors[:, None]
    ry = torch.minimum(torch.arange(hr, device=px.device)[None], reduced_hw[:, :1] - 1)  # replicate padding
    rx = torch.minimum(torch.arange(wr, device=px.device)[None], reduced_hw[:, 1:] - 1)
    y_lo = boxes[:, 1:2] + ry * k
    y_hi = torch.minimum(y_lo + k, boxes[:, 3:4])  # boxes are clipped at the crop's edge
    x_lo = boxes[:, 0:1] + rx * k
    x_hi = torch.minimum(x_lo + k, boxes[:, 2:3])
    img = image_index[:, None, None]

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sat[img, y[:, :, None], x[:, None, :]].to(torch.int64)  # (V, Hr, Wr, 3)

    sums = at(y_hi, x_hi) - at(y_lo, x_hi) - at(y_hi, x_lo) + at(y_lo, x_lo)
    count = ((y_hi - y_lo)[:, :, None] * (x_hi - x_lo)[:, None, :])[..., None]
    reduced = ((sums + count // 2) * (2**24 // count)) >> 24  # Pillow's rounding, bit-exact
    return reduced.to(torch.uint8).permute(0, 3, 1, 2)


def _equal_groups(index: np.ndarray, num_images: int) -> bool:
    """True when views are image 0's, then image 1's, ... with the same count for every image."""
    if num_images == 0 or len(index) % num_images:
        return False
    return bool(np.array_equal(index, np.repeat(np.arange(num_images), len(index) // num_images)))


def render_batch(sources: SourceBatch, image_index: Sequence[int] | np.ndarray, params: np.ndarray,
                 spec: ViewSpec) -> torch.Tensor:
    """Render V views (view j of image `image_index[j]`, params (V, P)) → (V, 3, h, w) uint8 on the device.

    Same pixels as `labelstore.render` within mean |Δ| <= 0.01, max |Δ| <= 1 (bilinear ViewSpecs).
    """
    if spec.interpolation != "bilinear":
        raise ValueError(f"the batched renderer supports interpolation 'bilinear' only, ViewSpec has "
                         f"{spec.interpolation!r}; use the Pillow backend (labelstore.render) for this ViewSpec")
    device = sources.pixels.device
    index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    params = np.asarray(params, dtype=np.float32).reshape(len(index), -1)
    if len(index) and (index.min() < 0 or index.max() >= len(sources.hw)):
        raise ValueError(f"image_index must lie in [0, {len(sources.hw)}), got {index.min()}..{index.max()}")
    geo = view_geometry(params, sources.hw[index], spec)
    origin = sources.origins[index]  # (y0, x0) of each view's held region in its image
    held = sources.region_hw[index]
    foot = _footprint(geo.boxes, sources.hw[index])
    outside = np.flatnonzero((foot[:, :2] < origin).any(1) | (foot[:, 2:] > origin + held).any(1))
    if len(outside):
        j = int(outside[0])
        raise ValueError(f"view {j} (image {int(index[j])}) reads source rows/cols {foot[j].tolist()} (y0, x0, y1, x1) "
                         f"but the SourceBatch holds only {np.r_[origin[j], origin[j] + held[j]].tolist()} of it")
    # Crop boxes in the held region's pixel coordinates (the geometry stays the whole image's).
    local_boxes = geo.boxes - np.concatenate([origin[:, ::-1], origin[:, ::-1]], 1)
    dtype = _float_dtype(device)
    out_h, out_w = spec.size
    v_count = len(index)
    out = torch.empty((v_count, 3, out_h, out_w), dtype=torch.uint8, device=device)
    if v_count == 0:
        return out

    def put(dev_rows: np.ndarray) -> torch.Tensor:
        return to_device(dev_rows, device)  # page-locked first on CUDA: no host sync per copy

    matrices = put(geo.matrices).to(dtype)
    reduced_hw = put(geo.reduced_hw)
    u, v = _sample_coords(matrices, (out_h, out_w))
    hr = reduced_hw[:, 0, None, None].to(dtype)
    wr = reduced_hw[:, 1, None, None].to(dtype)
    inside = (u >= 0) & (u < wr) & (v >= 0) & (v < hr)
    # Bilinear sample positions in pixel-index units, clamped to the reduced crop (Pillow's edge rule).
    su = torch.minimum(torch.clamp(u - 0.5, min=0.0), wr - 1)
    sv = torch.minimum(torch.clamp(v - 0.5, min=0.0), hr - 1)
    values = torch.empty((v_count, 3, out_h, out_w), dtype=dtype, device=device)
    _, _, hmax, wmax = sources.pixels.shape
    direct = np.flatnonzero(geo.factors == 1)
    grouped = _equal_groups(index, len(sources.hw))
    if grouped:
        # The common case (labeler: S views per image, trainer: one): views come grouped by image, so
        # the grid is a reshape and one grid_sample renders the whole batch. Views with k >= 2 are
        # sampled here too (wasted, but cheaper than splitting) and overwritten below.
        depth = v_count // len(sources.hw)
        boxes = put(local_boxes).to(dtype)
        grid = torch.stack([_normalized(su + boxes[:, 0, None, None], wmax),
                            _normalized(sv + boxes[:, 1, None, None], hmax)], -1)
        sampled = F.grid_sample(sources.pixels.to(dtype), grid.view(-1, depth * out_h, out_w, 2), mode="bilinear",
                                padding_mode="border", align_corners=False)
        values = sampled.view(-1, 3, depth, out_h, out_w).transpose(1, 2).reshape(v_count, 3, out_h, out_w)
    elif len(direct):
        # k = 1: sample the uploaded image itself at crop offset + position; the views of one image are
        # stacked along the grid's height so a single grid_sample serves them all.
        d = put(direct)
        boxes = put(local_boxes[direct]).to(dtype)
        gx = _normalized(su[d] + boxes[:, 0, None, None], wmax)
        gy = _normalized(sv[d] + boxes[:, 1, None, None], hmax)
        used, slot = np.unique(index[direct], return_inverse=True)
        order = np.argsort(slot, kind="stable")
        per_image = np.bincount(slot)
        depth = int(per_image.max())
        position = np.arange(len(order)) - np.repeat(np.cumsum(per_image) - per_image, per_image)
        grid = torch.zeros((len(used), depth, out_h, out_w, 2), dtype=dtype, device=device)
        which = put(slot[order]), put(position)
        grid[which] = torch.stack([gx, gy], -1)[put(order)]
        sampled = F.grid_sample(sources.pixels[put(used)].to(dtype), grid.view(len(used), depth * out_h, out_w, 2),
                                mode="bilinear", padding_mode="border", align_corners=False)
        values[put(direct[order])] = sampled.view(len(used), 3, depth, out_h, out_w).transpose(1, 2)[which]

    reduced = np.flatnonzero(geo.factors > 1)
    if len(reduced):
        r = put(reduced)
        used, slot = np.unique(index[reduced], return_inverse=True)
        crops = _reduced_crops(sources, put(used), put(slot.reshape(-1)), put(local_boxes[reduced]),
                               put(geo.factors[reduced]), reduced_hw[r],
                               tuple(int(v) for v in geo.reduced_hw[reduced].max(0)))
        _, _, hmax, wmax = crops.shape
        grid = torch.stack([_normalized(su[r], wmax), _normalized(sv[r], hmax)], -1)
        values[r] = F.grid_sample(crops.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)

    fill = to_device(np.array(spec.fill, np.float64), device).to(dtype)[None, :, None, None]
    values = torch.where(inside[:, None], values, fill)
    out.copy_(values.add_(_TRUNC_EPS[dtype]).floor_().clamp_(0, 255))
    return out
