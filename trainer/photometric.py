"""The student's share of the view's RandAugment draw: its photometric slots, as (op, argument) arrays.

A stored view holds one timm RandAugment draw (docs/design.md "Views"): the geometric slots are already in
the rendered pixels; the photometric slots are applied here, on the student's side only. They may be
re-drawn every epoch: a slot whose stored op is photometric gets a fresh op (uniform over the spec's
photometric ops), magnitude, applied coin and sign coin. timm draws all four independently of the slot's
kind, so conditioned on "this slot is photometric" the re-draw has exactly timm's distribution, and the
per-image count of geometric and photometric ops stays timm's (tests/test_photometric.py checks it against
timm's own RandAugment sampling).

Output per sample: `photo_ops` int8 (S,) = index into PHOTOMETRIC_OPS (-1: slot not applied or
geometric) and `photo_args` float32 (S,) = the op's argument exactly as timm's level-to-arg gives it,
applied in slot order. The CPU path (`apply_photometric_pil`) calls timm's own Pillow op functions; the
device path applies the same arrays batched (trainer/photometric_torch.py).
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP

from labelstore.views import PHOTO_OPS, RA_OPS, ViewSpec, view_slots

PHOTOMETRIC_OPS = PHOTO_OPS  # timm's inc1 photometric op names in timm's order, as the view record uses them

_LEVEL_DENOM = 10.0
_ENHANCE = {PHOTOMETRIC_OPS.index(n) for n in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                                "SharpnessIncreasing")}
_POSTERIZE, _SOLARIZE, _SOLARIZE_ADD = (PHOTOMETRIC_OPS.index(n) for n in
                                        ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"))
# RA_OPS index → PHOTOMETRIC_OPS index (-1 for the geometric ops)
_FROM_RA = np.array([PHOTOMETRIC_OPS.index(o) if o in PHOTOMETRIC_OPS else -1 for o in RA_OPS], np.int64)


def level_args(ops: np.ndarray, magnitude: np.ndarray, negate: np.ndarray) -> np.ndarray:
    """timm's level-to-arg of the inc1 photometric ops, vectorised: float32 like `ops`.

    Enhance ops: max(0.1, 1 ± m/10·0.9) (negated when the sign coin says so); posterize: 4 − int(m/10·4)
    bits, kept >= 1 (timm asks for 0 bits at m = 10, which Pillow >= 13 rejects); solarize: threshold
    256 − int(m/10·256); solarize-add: min(128, int(m/10·110)); the other ops take no argument (0).
    """
    ops = np.asarray(ops)
    m = np.asarray(magnitude, np.float64) / _LEVEL_DENOM
    sign = np.where(np.asarray(negate, bool), -1.0, 1.0)
    out = np.zeros(np.broadcast(ops, m).shape, np.float64)
    enhance = np.isin(ops, list(_ENHANCE))
    out = np.where(enhance, np.maximum(0.1, 1.0 + sign * m * 0.9), out)
    out = np.where(ops == _POSTERIZE, np.maximum(1, 4 - np.floor(m * 4)), out)
    out = np.where(ops == _SOLARIZE, 256 - np.minimum(256, np.floor(m * 256)), out)
    out = np.where(ops == _SOLARIZE_ADD, np.minimum(128, np.floor(m * 110)), out)
    return out.astype(np.float32)


def draw_photometric(params, spec: ViewSpec, rng: np.random.Generator, redraw: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`photo_ops` int8 (..., S) and `photo_args` float32 (..., S) for view records `params` (..., P).

    redraw=False applies the stored photometric slots as drawn with the view; redraw=True (the default)
    re-draws each photometric slot from `rng` (an explicit Generator: the caller seeds it per sample and
    epoch, or per (seed, rank, step)), keeping the slot's kind.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"draw_photometric: rng must be a numpy Generator, got {type(rng).__name__}")
    slots = view_slots(params)
    stored_op = slots[..., 0].astype(np.int64)
    is_photo = (stored_op >= 0) & (_FROM_RA[np.clip(stored_op, 0, len(RA_OPS) - 1)] >= 0)
    if redraw:
        choices = np.array([PHOTOMETRIC_OPS.index(o) for o in spec.photometric_ops], np.int64)
        shape = stored_op.shape
        op = choices[rng.integers(0, max(len(choices), 1), shape)] if len(choices) else np.full(shape, -1)
        applied = rng.random(shape) < spec.ra_prob
        m = (rng.normal(spec.ra_magnitude, spec.ra_magnitude_std, shape) if spec.ra_magnitude_std > 0
             else np.full(shape, spec.ra_magnitude))
        m = np.clip(m, 0.0, spec.ra_magnitude_max)
        negate = rng.random(shape) < 0.5
    else:
        op = _FROM_RA[np.clip(stored_op, 0, len(RA_OPS) - 1)]
        applied, m, negate = slots[..., 2] == 1, slots[..., 1], slots[..., 3] == 1
    keep = is_photo & applied
    photo_ops = np.where(keep, op, -1).astype(np.int8)
    photo_args = np.where(keep, level_args(np.where(keep, op, -1), m, negate), 0.0).astype(np.float32)
    return photo_ops, photo_args


def apply_photometric_pil(img: Image.Image, photo_ops, photo_args) -> Image.Image:
    """Apply one sample's (S,) ops in slot order with timm's own Pillow op functions."""
    for op, arg in zip(np.asarray(photo_ops).tolist(), np.asarray(photo_args).tolist()):
        if op < 0:
            continue
        name = PHOTOMETRIC_OPS[op]
        fn = NAME_TO_OP[name]
        if op in _ENHANCE:
            img = fn(img, float(arg))
        elif op in (_POSTERIZE, _SOLARIZE, _SOLARIZE_ADD):
            img = fn(img, int(arg))
        else:
            img = fn(img)
    return img
