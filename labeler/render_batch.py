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
Both samplings are one pure function, `sample_views`, which a GPU runs compiled: one fused kernel.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.fx.experimental._config  # noqa: F401 - the duck-sizing switch (see _compiled_traced_without_duck_sizes)
import torch.nn.functional as F

from labeler.device import to_device
from labelstore.views import NUM_PARAMS, ViewSpec, crop_boxes, view_geometry

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


def source_footprint(params: np.ndarray, src_hw: np.ndarray) -> np.ndarray:
    """(N, 4) int64 (y0, x0, y1, x1): the part of each source image `render_batch` reads for view params (N, P)
    of images of sizes (N, 2) or (2,): the crop box plus `FOOTPRINT_MARGIN`, clipped to the image.

    A data worker that knows the view it replays sends only this region (with its origin): about half the
    bytes at RandomResizedCrop's mean area fraction, and the render is bit-identical to the whole image's.
    Only the crop boxes are computed (`crop_boxes`), not the views' matrices: a worker calls this per sample.
    """
    params = np.asarray(params, np.float32)
    return _footprint(crop_boxes(params.reshape(-1, params.shape[-1]), src_hw), src_hw)


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


def sample_views(pixels: torch.Tensor, view_rows: torch.Tensor, fill: torch.Tensor, depth: int,
                 out_hw: tuple[int, int]) -> torch.Tensor:
    """The pixel arithmetic of a render: (N·depth, 3, h, w) uint8 views of N images, view j sampling image j // depth.

    pixels: (N, 3, H, W) uint8; view_rows: (N·depth, 10) in the render's float dtype, per view its (2, 3) matrix
    (output pixel centres → reduced-crop coordinates), the reduced crop's (h, w) and the crop's origin (x, y) in
    `pixels`; fill: (3,) the colour outside the crop. A pure function of tensors, so on a GPU it is compiled
    into one fused kernel (coordinates, bilinear taps read straight from the uint8 pixels, fill, truncation),
    where eagerly it is 46 kernels, each a pass over the views.
    """
    h, w = out_hw
    v_count = view_rows.shape[0]
    matrices = view_rows[:, :6].reshape(v_count, 2, 3)
    hr, wr = view_rows[:, 6, None, None], view_rows[:, 7, None, None]
    u, v = _sample_coords(matrices, out_hw)
    inside = (u >= 0) & (u < wr) & (v >= 0) & (v < hr)
    # Bilinear sample positions in pixel-index units, clamped to the reduced crop (Pillow's edge rule).
    su = torch.minimum(torch.clamp(u - 0.5, min=0.0), wr - 1)
    sv = torch.minimum(torch.clamp(v - 0.5, min=0.0), hr - 1)
    n, _, hmax, wmax = pixels.shape
    grid = torch.stack([_normalized(su + view_rows[:, 8, None, None], wmax),
                        _normalized(sv + view_rows[:, 9, None, None], hmax)], -1)
    # The views of one image are stacked along the grid's height: one grid_sample serves them all.
    sampled = F.grid_sample(pixels.to(view_rows.dtype), grid.view(n, depth * h, w, 2), mode="bilinear",
                            padding_mode="border", align_corners=False)
    values = sampled.view(n, 3, depth, h, w).transpose(1, 2).reshape(v_count, 3, h, w)
    values = torch.where(inside[:, None], values, fill.view(1, 3, 1, 1))
    return (values + _TRUNC_EPS[view_rows.dtype]).floor().clamp(0, 255).to(torch.uint8)


_compiled_sample_views = None  # built on first use: torch.compile(sample_views), sizes dynamic
_compile_failed: str | None = None  # why compiling failed: every later call runs eagerly


def _sampler(compiled: bool):
    if not compiled or _compile_failed is not None:
        return sample_views
    global _compiled_sample_views
    if _compiled_sample_views is None:
        # Dynamic sizes: every batch pads its sources to another (H, W), and that must not recompile.
        _compiled_sample_views = torch.compile(sample_views, dynamic=True)
    return _compiled_traced_without_duck_sizes


def _compiled_traced_without_duck_sizes(pixels: torch.Tensor, view_rows: torch.Tensor, fill: torch.Tensor,
                                        depth: int, out_hw: tuple[int, int]) -> torch.Tensor:
    global _compile_failed
    if pixels.shape[0] == 1:
        # torch specialises a size of 1 (a graph of its own, compiled mid-run the first time a batch has one
        # image or one box-reduced view): render it twice instead, so one graph per depth serves every batch.
        twice = _compiled_traced_without_duck_sizes(torch.cat([pixels, pixels]), torch.cat([view_rows, view_rows]),
                                                    fill, depth, out_hw)
        return twice[:depth]
    try:
        # Traced with duck sizing off: by default sizes equal at the first call are assumed equal for ever (a
        # square padded batch, H == W, would make the next non-square one recompile, and compiles per function
        # are capped). Guards and replays do not read the setting, so it matters only while a call compiles.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return _compiled_sample_views(pixels, view_rows, fill, depth, out_hw)
    except Exception as e:  # noqa: BLE001 - a compiler that fails here must not stop a job: same pixels eagerly
        _compile_failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"compiling the renderer failed, rendering eagerly from now on: {_compile_failed}", stacklevel=3)
        return sample_views(pixels, view_rows, fill, depth, out_hw)  # an error of the inputs is raised from here


def warm_up_render(spec: ViewSpec, views_per_image: int, device: torch.device | str,
                   compiled: bool | None = None) -> None:
    """Render one small synthetic batch, so a compiled `sample_views` is compiled before a timed run: views
    grouped `views_per_image` per image, and a box-reduced one (the two graphs a run meets)."""
    device = torch.device(device)
    h, w = spec.size
    hw = np.array([[4 * h, 4 * w]] * 2, np.int64)
    # Laid out as uploads are (`upload_flat`: HWC pixels seen as NCHW): compiled code is specialised to strides.
    pixels = torch.zeros((2, 4 * h, 4 * w, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    small = np.zeros(NUM_PARAMS, np.float32)  # a crop of the output's size: k = 1, sampled directly
    small[:4] = (0, 0, w, h)
    whole = small.copy()  # the whole image: k = 4, a reduced view
    whole[2:4] = (4 * w, 4 * h)
    params = np.stack([whole] + [small] * (2 * views_per_image - 1))
    render_batch(SourceBatch(pixels, hw), np.repeat(np.arange(2), views_per_image), params, spec, compiled)


def _equal_groups(index: np.ndarray, num_images: int) -> bool:
    """True when views are image 0's, then image 1's, ... with the same count for every image."""
    if num_images == 0 or len(index) % num_images:
        return False
    return bool(np.array_equal(index, np.repeat(np.arange(num_images), len(index) // num_images)))


def render_batch(sources: SourceBatch, image_index: Sequence[int] | np.ndarray, params: np.ndarray,
                 spec: ViewSpec, compiled: bool | None = None) -> torch.Tensor:
    """Render V views (view j of image `image_index[j]`, params (V, P)) → (V, 3, h, w) uint8 on the device.

    Same pixels as `labelstore.render` within mean |Δ| <= 0.01, max |Δ| <= 1 (bilinear ViewSpecs).
    `compiled` (default: on a GPU) runs `sample_views` through torch.compile (compiled once, any source size).
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
    out_hw = tuple(spec.size)
    v_count = len(index)
    if v_count == 0:
        return torch.empty((0, 3, *out_hw), dtype=torch.uint8, device=device)

    def put(host: np.ndarray) -> torch.Tensor:
        return to_device(host, device)  # page-locked first on CUDA: no host sync per copy

    # Everything a view's sampling needs, one row per view, made on the host in the render's dtype: one upload.
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    rows = np.concatenate([geo.matrices.reshape(v_count, 6), geo.reduced_hw, local_boxes[:, :2]], 1).astype(np_dtype)
    fill = put(np.asarray(spec.fill, np_dtype))
    sample = _sampler(device.type == "cuda" if compiled is None else compiled)
    if _equal_groups(index, len(sources.hw)):
        # The common case (labeler: S views per image, trainer: one): views come grouped by image, so one call
        # renders the whole batch. Views with k >= 2 are sampled here too (wasted, but cheaper than splitting)
        # and overwritten below.
        out = sample(sources.pixels, put(rows), fill, v_count // len(sources.hw), out_hw)
    else:
        out = torch.empty((v_count, 3, *out_hw), dtype=torch.uint8, device=device)
        direct = np.flatnonzero(geo.factors == 1)
        if len(direct):
            # k = 1 in any order: grouped by image on the host, each group padded to the largest with copies of
            # its first view (rendered, then dropped).
            used, slot = np.unique(index[direct], return_inverse=True)
            order = np.argsort(slot, kind="stable")
            per_image = np.bincount(slot)
            depth = int(per_image.max())
            firsts = np.cumsum(per_image) - per_image
            at = slot[order] * depth + (np.arange(len(order)) - np.repeat(firsts, per_image))
            slot_rows = np.repeat(rows[direct[order]][firsts], depth, 0)
            slot_rows[at] = rows[direct[order]]
            sampled = sample(sources.pixels[put(used)], put(slot_rows), fill, depth, out_hw)
            out[put(direct[order])] = sampled[put(at)]

    reduced = np.flatnonzero(geo.factors > 1)
    if len(reduced):
        used, slot = np.unique(index[reduced], return_inverse=True)
        crops = _reduced_crops(sources, put(used), put(slot.reshape(-1)), put(local_boxes[reduced]),
                               put(geo.factors[reduced]), put(geo.reduced_hw[reduced]),
                               tuple(int(v) for v in geo.reduced_hw[reduced].max(0)))
        crop_rows = rows[reduced].copy()
        crop_rows[:, 8:] = 0  # each crop starts at its buffer's corner
        out[put(reduced)] = sample(crops, put(crop_rows), fill, 1, out_hw)
    return out
