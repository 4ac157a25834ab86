"""timm's photometric RandAugment ops on uint8 image tensors, batched on the training device.

The student's photometric slots (op index + timm's argument, drawn in the data workers by
`trainer.photometric`) are applied here after the GPU render: one group of kernels per (slot, op)
for all the samples that drew it, with per-sample arguments, on one gathered batch per slot; the
grouping happens on the host from the collated slot arrays, so nothing waits on the device. Each op
re-does timm's Pillow op (`timm.data.auto_augment`: ImageOps / ImageEnhance) with Pillow's integer
conventions:

* LUT ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast):
  a per-sample, per-channel 256-entry table built exactly as Pillow builds it, then one gather for all
  the LUT ops of a slot together. The tables that depend on the argument alone (Invert, Posterize,
  Solarize, SolarizeAdd, Brightness) are made on the host in the same arithmetic and uploaded with the
  slot: on a GPU every op is a launch issued from Python, and a host-bound step pays for each;
* blends (Color, Contrast, Brightness, Sharpness): `Image.blend(degenerate, img, f)` =
  trunc(d + f·(x − d)) in float32, clipped to [0, 255], as Pillow's C code;
* Color's grey is Pillow's RGB→L (R·19595 + G·38470 + B·7471 + 2^15) >> 16; Sharpness's degenerate is
  ImageFilter.SMOOTH (3×3, centre 5, sum 13) inside, the original pixels on the 1-pixel border.

tests/test_photometric_torch.py compares every op with timm's own Pillow op on real photos and prints
the mean |Δ| (docs/design.md "The train-time data path").
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from labeler.device import to_device
from trainer.photometric import PHOTOMETRIC_OPS


def to_table(lut: torch.Tensor) -> torch.Tensor:
    """A LUT of levels (any integer-valued dtype) → the uint8 table it applies."""
    return lut.clamp(0, 255).to(torch.uint8)


def apply_table(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x uint8 (n, 3, H, W), table uint8 (n, 3, 256) → uint8 (n, 3, H, W): one gather."""
    n, c, h, w = x.shape
    return torch.gather(table, 2, x.reshape(n, c, h * w).long()).view(n, c, h, w)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x uint8 (n, 3, H, W), lut (n, 3, 256) integer → uint8 (n, 3, H, W)."""
    return apply_table(x, to_table(lut))


def _levels(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(256, device=x.device, dtype=dtype).expand(x.shape[0], x.shape[1], 256)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel histograms (n, 3, 256) int64 in one scatter-add (bincount would read the
    largest value back to the host to size its output: a device sync)."""
    n, c = x.shape[:2]
    offsets = (torch.arange(n * c, device=x.device) * 256).view(n, c, 1)
    flat = (x.reshape(n, c, -1).long() + offsets).reshape(-1)
    counts = torch.zeros(n * c * 256, dtype=torch.int64, device=x.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).view(n, c, 256)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.blend(degenerate, x, factor): float32 d + f·(x − d), truncated, clipped."""
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    d = degenerate.to(torch.float32)
    return (d + f * (x.to(torch.float32) - d)).clamp_(0, 255).trunc_().to(torch.uint8)


def _blend_levels(degenerate: torch.Tensor, factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The LUT of a blend with a constant degenerate per (sample, channel): (n, 3, 1) degenerate values."""
    f = factor.to(torch.float32).view(-1, 1, 1)
    d = degenerate.to(torch.float32)
    return (d + f * (_levels(x) - d)).clamp_(0, 255).trunc_()


def auto_contrast(x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    return _apply_lut(x, auto_contrast_lut(x, arg))


def auto_contrast_lut(x: torch.Tensor, _arg: torch.Tensor) -> torch.Tensor:
    # ImageOps.autocontrast(cutoff=0): per channel, scale [lo, hi] to [0, 255] with int() truncation.
    lo = x.amin(dim=(2, 3)).to(torch.float64)[..., None]
    hi = x.amax(dim=(2, 3)).to(torch.float64)[..., None]
    span = (hi - lo).clamp(min=1)
    scale = torch.full_like(span, 255.0) / span  # a true division: `255.0 / t` is a reciprocal product in torch
    lut = (_levels(x, torch.float64) * scale - lo * scale).trunc().clamp(0, 255)
    return torch.where(hi > lo, lut, _levels(x, torch.float64))


def equalize(x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    return _apply_lut(x, equalize_lut(x, arg))


def equalize_lut(x: torch.Tensor, _arg: torch.Tensor) -> torch.Tensor:
    # ImageOps.equalize: step = (count − count of the last used level) // 255; lut[i] = (step//2 + Σ_{j<i} h_j) // step.
    h = _histogram(x)
    levels = torch.arange(256, device=x.device)
    last = torch.where(h > 0, levels, -1).amax(dim=2, keepdim=True)
    last_count = torch.gather(h, 2, last.clamp(min=0))
    step = (h.sum(dim=2, keepdim=True) - last_count) // 255
    used = (h > 0).sum(dim=2, keepdim=True)
    before = torch.cumsum(h, dim=2) - h
    lut = (step // 2 + before) // step.clamp(min=1)
    return torch.where((used > 1) & (step > 0), lut, levels.expand_as(lut))


def invert(x: torch.Tensor, _arg: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    # Keep the top `bits` bits (8 or more: unchanged, as timm's posterize).
    b = bits.round().clamp(0, 8).to(torch.int32)
    mask = ((0xFF << (8 - b)) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return x & mask


def solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    t = thresh.view(-1, 1, 1, 1)
    return torch.where(x.to(torch.float32) >= t, 255 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # timm's solarize_add: levels below 128 get +add (capped at 255), the others stay.
    a = add.round().to(torch.int32).view(-1, 1, 1, 1)
    y = x.to(torch.int32)
    return torch.where(y < 128, (y + a).clamp(0, 255), y).to(torch.uint8)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB → L (ITU-R 601-2 luma in 16-bit fixed point), (n, 1, H, W) int64."""
    weighted = (x.to(torch.int32) * _luma_weights(x.device)).sum(dim=1, keepdim=True)  # exact: integers
    return (weighted + 0x8000) >> 16


@functools.lru_cache(maxsize=None)
def _luma_weights(device: torch.device) -> torch.Tensor:
    return to_device(np.array([19595, 38470, 7471], np.int32).reshape(1, 3, 1, 1), device)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(grey(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _apply_lut(x, contrast_lut(x, factor))


def contrast_lut(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # ImageEnhance.Contrast: a flat grey image at int(mean(L) + 0.5).
    mean = grey(x).to(torch.float64).mean(dim=(1, 2, 3))
    d = (mean + 0.5).floor().view(-1, 1, 1).expand(-1, 3, 1)
    return _blend_levels(d, factor, x)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _apply_lut(x, _blend_levels(torch.zeros((x.shape[0], 3, 1), device=x.device), factor, x))


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


@functools.lru_cache(maxsize=None)
def _smooth_kernel(device: torch.device) -> torch.Tensor:
    return to_device(_SMOOTH, device)  # once per device, not one upload per call


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # ImageFilter.SMOOTH, rounded to the nearest level; Pillow leaves the outer ring of pixels unfiltered.
    n, c, h, w = x.shape
    kernel = _smooth_kernel(x.device).expand(c, 1, 3, 3)
    smooth = F.conv2d(x.to(torch.float32), kernel, groups=c).add_(0.5).floor_().clamp_(0, 255)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.to(torch.uint8)
    return _blend(degenerate, x, factor)


OPS = (auto_contrast, equalize, invert, posterize, solarize, solarize_add, color, contrast, brightness, sharpness)


def _host_levels(kind: int, args: np.ndarray) -> np.ndarray:
    """(n, 256) uint8 LUTs of an op whose table depends on its argument alone, made on the host with the
    device functions' arithmetic (integers; Brightness's float32 product, truncated), so no device op builds them."""
    levels = np.arange(256, dtype=np.int64)
    if OPS[kind] is invert:
        lut = np.broadcast_to(255 - levels, (len(args), 256))
    elif OPS[kind] is posterize:
        bits = np.clip(np.round(args), 0, 8).astype(np.int64)  # round half to even, as torch
        lut = levels[None] & ((0xFF << (8 - bits)) & 0xFF)[:, None]
    elif OPS[kind] is solarize:
        lut = np.where(levels[None].astype(np.float32) >= args.astype(np.float32)[:, None], 255 - levels, levels)
    elif OPS[kind] is solarize_add:
        add = np.round(args).astype(np.int64)[:, None]
        lut = np.where(levels[None] < 128, np.clip(levels[None] + add, 0, 255), levels[None])
    elif OPS[kind] is brightness:  # blend with black: 0 + f · (level − 0) in float32, clipped, truncated
        lut = np.trunc(np.clip(args.astype(np.float32)[:, None] * levels.astype(np.float32)[None], 0, 255))
    else:
        raise ValueError(f"{OPS[kind].__name__} has no host-made LUT")
    return lut.astype(np.uint8)


# How each op of a slot is applied (see apply_photometric): a LUT made on the host, a LUT made on the device from
# the images' statistics, or the op itself. The slot's rows are sorted in that order, then by op.
_HOST_LUT = frozenset(OPS.index(op) for op in (invert, posterize, solarize, solarize_add, brightness))
_DEVICE_LUT = {OPS.index(auto_contrast): auto_contrast_lut, OPS.index(equalize): equalize_lut,
               OPS.index(contrast): contrast_lut}
_RANK = np.array([k if k in _HOST_LUT else k + len(OPS) if k in _DEVICE_LUT else k + 2 * len(OPS)
                  for k in range(len(OPS))])


def check_images(images: torch.Tensor) -> None:
    """The photometric ops take uint8 (B, 3, H, W) batches; anything else is a clear error."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the photometric ops need uint8 (B, 3, H, W) images, got {tuple(images.shape)} "
                         f"{images.dtype}")


def apply_photometric(images: torch.Tensor, photo_ops, photo_args) -> torch.Tensor:
    """Apply each sample's photometric slots in slot order → uint8 (B, 3, H, W) on the images' device.

    images: uint8 (B, 3, H, W); photo_ops: int (B, S) index into PHOTOMETRIC_OPS, -1 = slot not applied;
    photo_args: float (B, S), timm's argument for the op (enhance factor, posterize bits, solarize
    threshold, solarize-add amount; ignored by AutoContrast / Equalize / Invert). The slot arrays
    should be on the host (they come from the collate): grouping them needs no device sync then.
    """
    check_images(images)
    ops = np.asarray(photo_ops.cpu() if torch.is_tensor(photo_ops) else photo_ops).astype(np.int64)
    args = (photo_args.cpu().float() if torch.is_tensor(photo_args)
            else torch.as_tensor(np.asarray(photo_args, dtype=np.float32)))
    if ops.ndim != 2 or ops.shape[0] != images.shape[0] or args.shape != ops.shape:
        raise ValueError(f"photo_ops {ops.shape} and photo_args {tuple(args.shape)} must both be (B, S) with "
                         f"B = {images.shape[0]} images")
    if ops.size and (ops.min() < -1 or ops.max() >= len(OPS)):
        raise ValueError(f"photo_ops must lie in [-1, {len(OPS) - 1}] (index into {PHOTOMETRIC_OPS}), got "
                         f"{ops.min()}..{ops.max()}")
    if not (ops >= 0).any():
        return images
    out = images.clone()  # the caller's batch is never changed in place
    device_args = to_device(args, images.device)
    host_args = args.numpy()
    for slot in range(ops.shape[1]):
        kinds = ops[:, slot]
        rows = np.flatnonzero(kinds >= 0)
        if not len(rows):
            continue
        # The slot's samples sorted by how their op applies, then by op: each op's samples are one contiguous
        # slice of a single gathered batch (one upload, gather and scatter per slot, not per op: on a GPU every
        # call is a launch), and every LUT op's samples come first, so all of them take one table gather.
        order = rows[np.argsort(_RANK[kinds[rows]], kind="stable")]
        sorted_kinds = kinds[order]
        cuts = np.flatnonzero(np.diff(sorted_kinds)) + 1
        groups = list(zip(sorted_kinds[np.r_[0, cuts]].tolist(), np.r_[0, cuts].tolist(),
                          np.r_[cuts, len(order)].tolist()))
        in_place = np.array_equal(order, np.arange(len(ops)))  # every sample, already in order: no gather
        if in_place:
            picked, picked_args = out, device_args[:, slot]
        else:
            idx = to_device(order, images.device)
            picked, picked_args = out[idx], device_args[:, slot][idx]
        host_groups = [(k, a, b) for k, a, b in groups if k in _HOST_LUT]
        tables = []
        if host_groups:  # one upload for every host-made LUT of the slot
            made = np.concatenate([_host_levels(k, host_args[order[a:b], slot]) for k, a, b in host_groups])
            tables.append(to_device(made, images.device)[:, None].expand(-1, 3, -1))
        tables += [to_table(_DEVICE_LUT[k](picked[a:b], picked_args[a:b])) for k, a, b in groups if k in _DEVICE_LUT]
        lut_groups = [(k, a, b) for k, a, b in groups if k in _HOST_LUT or k in _DEVICE_LUT]  # the first ones
        if lut_groups:
            end = lut_groups[-1][2]
            picked[:end] = apply_table(picked[:end], tables[0] if len(tables) == 1 else torch.cat(tables))
        for k, a, b in groups[len(lut_groups):]:
            picked[a:b] = OPS[k](picked[a:b], picked_args[a:b])
        if not in_place:
            out[idx] = picked
    return out
