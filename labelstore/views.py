"""Views: the one definition of the spatial transform the teacher saw, replayed exactly by the trainer.

A view is random-resized-crop → horizontal flip → ONE RandAugment draw (timm `rand-m9-mstd0.5-inc1`:
`ra_num_ops` slots, each an op drawn with replacement from timm's 15 `inc1` ops, a magnitude
~ N(m, std) clipped, an "applied" coin with p = `ra_prob`, and the sign coin of the ops timm negates),
drawn once from `SeedSequence(store_seed, spawn_key=(row, view))` into a fixed float32 record
(`PARAM_FIELDS`) that the store keeps. Readers never re-sample the geometry.

The draw is split by kind: the geometric slots (Rotate, ShearX/Y, TranslateX/YRel) are resolved into
the rotate/shear/translate fields that the render applies (the teacher sees them); the photometric
slots of the same draw are applied by the student (trainer/photometric.py), which may re-draw them
each epoch conditioned on their kind, so the per-image op distribution stays timm's.

Pixel convention (the only one used anywhere): pixel i spans [i, i+1); a 2×3 matrix maps *output*
pixel coordinates to *source* coordinates, exactly Pillow's AFFINE `data`.

Rendering, in this order (every backend must do the same):
  1. `crop_box(params)`: the integer crop box (x0, y0, x1, y1) in the RGB source image;
  2. `reduce_factor(params, src_hw, spec)` = k: box-reduce that crop by k (Pillow `Image.reduce(k, box)`)
     so large downscales do not alias; k depends only on the params and the output size;
  3. `view_matrix(params, src_hw, spec)`: affine from output pixels into the *reduced crop*
     (size ceil(w/k) × ceil(h/k)); samples outside it take `spec.fill`.
Geometric ops are applied in a fixed canonical order (rotate, shear-x, shear-y, translate-x,
translate-y) and an op drawn twice adds up; timm applies them in slot order, which differs only when
two distinct geometric ops are both applied (about 2 % of views): a difference in the view
distribution, not in replay. The student's photometric ops come after the whole geometric render.
Any change to drawing or rendering must bump ALGO_VERSION (golden tests pin both).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import ViewSpecError
from .images import DEFAULT_FILL, to_rgb

ALGO_VERSION = 2  # 2: one RandAugment draw per view over all 15 ops, slots stored (1: 2 geometric-only slots)

PARAM_FIELDS = (
    "crop_x", "crop_y", "crop_w", "crop_h",  # integer crop box in source pixels (x0, y0, width, height)
    "flip",  # 1.0 = mirrored left-right after the crop
    "rotate",  # degrees, counter-clockwise (Pillow's Image.rotate sign), about the output centre
    "shear_x", "shear_y",  # shear factors (timm ShearX/ShearY)
    "translate_x", "translate_y",  # fractions of the output width/height (timm TranslateXRel/YRel)
)
# timm's `inc1` RandAugment op list (timm.data.auto_augment._RAND_INCREASING_TRANSFORMS, its order; a test
# pins it): a slot's op is an index into it. labelstore does not import timm (no torch here).
RA_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
          "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
          "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEO_FIELD = {"Rotate": "rotate", "ShearX": "shear_x", "ShearY": "shear_y", "TranslateXRel": "translate_x",
             "TranslateYRel": "translate_y"}  # geometric op → the param field it adds to
PHOTO_OPS = tuple(o for o in RA_OPS if o not in GEO_FIELD)
MAX_SLOTS = 3  # slots the record holds; unused ones have op = -1
SLOT_FIELDS = ("op", "magnitude", "applied", "negate")  # op: index into RA_OPS; magnitude: clipped level
PARAM_FIELDS = PARAM_FIELDS + tuple(f"slot{i}_{f}" for i in range(MAX_SLOTS) for f in SLOT_FIELDS)
SLOT0 = PARAM_FIELDS.index("slot0_op")
NUM_PARAMS = len(PARAM_FIELDS)
_IDX = {name: i for i, name in enumerate(PARAM_FIELDS)}

GEO_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")  # the geometric param fields
_LEVEL_DENOM = 10.0  # timm: level = magnitude / 10, so magnitude 10 gives the op's maximum
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


def _pair(value: Any, name: str, kind: type) -> tuple:
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ViewSpecError(f"ViewSpec.{name} must be a pair of {kind.__name__}, got {value!r}") from e
    if len(out) != 2:
        raise ViewSpecError(f"ViewSpec.{name} must have 2 values, got {value!r}")
    return out


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn and rendered. Frozen, validated, JSON round-trip."""

    size: tuple[int, int] = (224, 224)  # output (h, w)
    scale: tuple[float, float] = (0.08, 1.0)  # crop area fraction (torchvision RandomResizedCrop)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect w/h
    hflip: float = 0.5  # probability of a horizontal flip
    ra_ops: tuple[str, ...] = RA_OPS  # timm names, a subset of RA_OPS
    ra_num_ops: int = 2  # RandAugment slots per view (ops drawn with replacement, as timm's n)
    ra_prob: float = 0.5  # probability that a slot's op is applied (timm's p)
    ra_magnitude: float = 9.0  # RandAugment m
    ra_magnitude_std: float = 0.5  # magnitude ~ N(m, std), clipped to [0, ra_magnitude_max]
    ra_magnitude_max: float = 10.0
    rotate_max_deg: float = 30.0  # value at level 1 (magnitude 10)
    shear_max: float = 0.3
    translate_max: float = 0.45  # fraction of the output size
    fill: tuple[int, int, int] = DEFAULT_FILL
    interpolation: str = "bilinear"
    algo_version: int = ALGO_VERSION

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise JSON lists)
        set_("size", _pair(self.size, "size", int))
        set_("scale", _pair(self.scale, "scale", float))
        set_("ratio", _pair(self.ratio, "ratio", float))
        set_("ra_ops", tuple(str(o) for o in self.ra_ops))
        try:
            set_("fill", tuple(int(v) for v in self.fill))
        except (TypeError, ValueError) as e:
            raise ViewSpecError(f"ViewSpec.fill must be 3 ints in 0..255, got {self.fill!r}") from e
        for name in ("hflip", "ra_prob", "ra_magnitude", "ra_magnitude_std", "ra_magnitude_max",
                     "rotate_max_deg", "shear_max", "translate_max"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ViewSpecError(f"ViewSpec.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
            set_(name, v)
        checks = [
            (min(self.size) >= 1, f"size must be positive (h, w), got {self.size}"),
            (0 < self.scale[0] <= self.scale[1] <= 1, f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}"),
            (0 < self.ratio[0] <= self.ratio[1] and math.isfinite(self.ratio[1]),
             f"ratio must satisfy 0 < lo <= hi, got {self.ratio}"),
            (self.hflip <= 1, f"hflip is a probability, got {self.hflip}"),
            (self.ra_prob <= 1, f"ra_prob is a probability, got {self.ra_prob}"),
            (set(self.ra_ops) <= set(RA_OPS) and len(set(self.ra_ops)) == len(self.ra_ops),
             f"ra_ops must be distinct names from timm's inc1 list {RA_OPS}, got {self.ra_ops}"),
            (isinstance(self.ra_num_ops, int) and 0 <= self.ra_num_ops <= MAX_SLOTS,
             f"ra_num_ops must be an int in 0..{MAX_SLOTS} (slots the view record holds), got {self.ra_num_ops!r}"),
            (len(self.fill) == 3 and all(0 <= v <= 255 for v in self.fill), f"fill must be 3 ints in 0..255, got {self.fill}"),
            (self.interpolation in _RESAMPLE, f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ViewSpecError(f"ViewSpec.{msg}")
        if self.algo_version != ALGO_VERSION:
            raise ViewSpecError(f"ViewSpec.algo_version {self.algo_version} cannot be replayed by this code "
                                f"(view algorithm version {ALGO_VERSION}); relabel or use the matching release")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViewSpec":
        version = d.get("algo_version", ALGO_VERSION)
        if version != ALGO_VERSION:  # before the key check: an old store's spec has other keys
            raise ViewSpecError(f"ViewSpec.algo_version {version} cannot be replayed by this code (view algorithm "
                                f"version {ALGO_VERSION}: one RandAugment draw per view, slots stored); relabel "
                                f"with `stl-labels generate` or use the release that wrote it (docs/store-format.md)")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ViewSpecError(f"unknown ViewSpec keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "ViewSpec":
        return cls.from_dict(json.loads(s))

    def max_abs(self, op: str) -> float:
        """Largest |value| of a param field that all op slots together can reach (for range checks)."""
        if op not in {GEO_FIELD[o] for o in self.ra_ops if o in GEO_FIELD}:
            return 0.0
        level = self.ra_magnitude_max / _LEVEL_DENOM  # magnitudes are clipped to [0, max]
        return self.ra_num_ops * level * self.op_max(op)

    def op_max(self, field: str) -> float:
        """A geometric field's value at level 1 (magnitude 10)."""
        return {"rotate": self.rotate_max_deg, "shear_x": self.shear_max, "shear_y": self.shear_max,
                "translate_x": self.translate_max, "translate_y": self.translate_max}[field]

    @property
    def photometric_ops(self) -> tuple[str, ...]:
        """The photometric members of ra_ops (what the student applies), in timm's order."""
        return tuple(o for o in self.ra_ops if o not in GEO_FIELD)


# --- drawing -------------------------------------------------------------------------------------

def _draw_crop(rng: np.random.Generator, spec: ViewSpec, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params semantics (10 tries, then a ratio-clamped centre crop)."""
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h


def draw_view_params(spec: ViewSpec, store_seed: int, row: int, view: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Draw one view's params (NUM_PARAMS,) float32 from SeedSequence(store_seed, spawn_key=(row, view))."""
    height, width = (int(v) for v in image_hw)
    if height < 1 or width < 1:
        raise ViewSpecError(f"row {row}: image size must be positive, got (h, w) = {tuple(image_hw)}")
    if min(int(store_seed), int(row), int(view)) < 0:
        raise ViewSpecError(f"store_seed, row and view must be >= 0, got {(store_seed, row, view)}")
    rng = np.random.default_rng(np.random.SeedSequence(int(store_seed), spawn_key=(int(row), int(view))))
    p = np.zeros(NUM_PARAMS, np.float64)
    p[0:4] = _draw_crop(rng, spec, height, width)
    p[_IDX["flip"]] = float(rng.random() < spec.hflip)
    p[SLOT0::len(SLOT_FIELDS)] = -1.0  # empty slots
    for slot in range(spec.ra_num_ops if spec.ra_ops else 0):
        # Four draws per slot whether or not the op applies, so the stream layout is fixed.
        op, applied, m, negate = draw_slot(rng, spec)
        base = SLOT0 + slot * len(SLOT_FIELDS)
        p[base:base + len(SLOT_FIELDS)] = (RA_OPS.index(op), m, float(applied), float(negate))
        if applied and op in GEO_FIELD:
            field = GEO_FIELD[op]
            value = m / _LEVEL_DENOM * spec.op_max(field)
            p[_IDX[field]] += -value if negate else value
    return p.astype(np.float32)


def draw_slot(rng: np.random.Generator, spec: ViewSpec) -> tuple[str, bool, float, bool]:
    """One RandAugment slot as timm draws it: (op, applied, clipped magnitude, sign coin)."""
    op = spec.ra_ops[int(rng.integers(len(spec.ra_ops)))]
    applied = bool(rng.random() < spec.ra_prob)
    m = rng.normal(spec.ra_magnitude, spec.ra_magnitude_std) if spec.ra_magnitude_std > 0 else spec.ra_magnitude
    negate = bool(rng.random() < 0.5)
    return op, applied, float(min(max(m, 0.0), spec.ra_magnitude_max)), negate


def view_slots(params: Any) -> np.ndarray:
    """The stored slots of view records (..., P) as (..., MAX_SLOTS, 4) float32: op, magnitude, applied, negate."""
    p = np.asarray(params, np.float32)
    return p[..., SLOT0:SLOT0 + MAX_SLOTS * len(SLOT_FIELDS)].reshape(*p.shape[:-1], MAX_SLOTS, len(SLOT_FIELDS))


def draw_views(spec: ViewSpec, store_seed: int, row: int, num_views: int, image_hw: tuple[int, int]) -> np.ndarray:
    """All views of one row: (num_views, NUM_PARAMS) float32."""
    out = np.empty((num_views, NUM_PARAMS), np.float32)
    for v in range(num_views):
        out[v] = draw_view_params(spec, store_seed, row, v, image_hw)
    return out


# --- geometry (pure) -----------------------------------------------------------------------------

def _as_params(params: Any) -> np.ndarray:
    # Always compute from the float32 record as stored, so writer and reader get the same matrix.
    p = np.asarray(params, dtype=np.float32)
    if p.shape != (NUM_PARAMS,):
        raise ViewSpecError(f"view params must have shape ({NUM_PARAMS},) {PARAM_FIELDS}, got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ViewSpecError(f"view params contain NaN/inf: {p.tolist()}")
    return p.astype(np.float64)


def crop_box(params: Any) -> tuple[int, int, int, int]:
    """Integer crop box (x0, y0, x1, y1) in source pixels."""
    p = _as_params(params)
    x, y, w, h = (int(round(v)) for v in p[0:4])
    return x, y, x + w, y + h


def _check_box(box: tuple[int, int, int, int], src_hw: tuple[int, int]) -> None:
    x0, y0, x1, y1 = box
    h, w = (int(v) for v in src_hw)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ViewSpecError(f"crop box {box} does not fit in the source image (h, w) = {(h, w)}")


def reduce_factor(params: Any, src_hw: tuple[int, int], spec: ViewSpec) -> int:
    """Integer box-reduction factor k applied to the crop before warping (k >= 1).

    k = floor(min(crop_w / out_w, crop_h / out_h)): the remaining bilinear warp then shrinks by less
    than 2, where it no longer aliases visibly. A pure function of the params, so every backend agrees.
    """
    return int(view_geometry(_as_params(params)[None], src_hw, spec).factors[0])


def _affines(rows: list[list[Any]]) -> np.ndarray:
    """Stack per-view 2×3 rows [[a, b, c], [d, e, f]] (entries scalars or (N,) arrays) into (N, 3, 3)."""
    a = np.stack([np.stack(np.broadcast_arrays(*r), -1) for r in rows], -2)  # (N, 2, 3)
    bottom = np.broadcast_to(np.array([0.0, 0.0, 1.0]), (*a.shape[:-2], 1, 3))
    return np.concatenate([a, bottom], -2)


def _matrices(p: np.ndarray, spec: ViewSpec, k: np.ndarray) -> np.ndarray:
    """(N, 3, 3) output → reduced-crop matrices for params (N, P) float64 and reduce factors k (N,)."""
    out_h, out_w = spec.size
    cx, cy = out_w / 2.0, out_h / 2.0
    one, zero = np.ones(p.shape[0]), np.zeros(p.shape[0])
    # Each op's matrix maps its output coords to its input coords; a chain applied as op1 then op2
    # maps output → source by A1 @ A2. Chain: reduce ∘ crop-resize ∘ flip ∘ rotate ∘ shear ∘ translate.
    to_reduced = _affines([[1.0 / k, zero, zero], [zero, 1.0 / k, zero]])
    crop_resize = _affines([[p[:, 2] / out_w, zero, zero], [zero, p[:, 3] / out_h, zero]])  # crop-local coords
    mirrored = p[:, _IDX["flip"]] >= 0.5
    flip = _affines([[np.where(mirrored, -1.0, 1.0), zero, np.where(mirrored, float(out_w), 0.0)], [zero, one, zero]])
    a = -np.radians(p[:, _IDX["rotate"]])  # Pillow's Image.rotate: counter-clockwise about the centre
    ca, sa = np.cos(a), np.sin(a)
    rotate = _affines([[ca, sa, cx - ca * cx - sa * cy], [-sa, ca, cy + sa * cx - ca * cy]])
    shear_x = _affines([[one, p[:, _IDX["shear_x"]], zero], [zero, one, zero]])
    shear_y = _affines([[one, zero, zero], [p[:, _IDX["shear_y"]], one, zero]])
    translate = _affines([[one, zero, p[:, _IDX["translate_x"]] * out_w],
                          [zero, one, p[:, _IDX["translate_y"]] * out_h]])
    return to_reduced @ crop_resize @ flip @ rotate @ shear_x @ shear_y @ translate


def _matrix(p: np.ndarray, spec: ViewSpec, k: int) -> np.ndarray:
    return _matrices(p[None], spec, np.array([float(k)]))[0]


@dataclass(frozen=True)
class ViewGeometry:
    """The geometry of N views, as arrays over views (what a batched renderer needs).

    boxes: (N, 4) int64 crop boxes (x0, y0, x1, y1) in the source; factors: (N,) int64 box-reduce
    factors k; reduced_hw: (N, 2) int64 size of the reduced crop (ceil(h/k), ceil(w/k)); matrices:
    (N, 2, 3) float64, output pixel → reduced-crop coords (Pillow's AFFINE `data`).
    """

    boxes: np.ndarray
    factors: np.ndarray
    reduced_hw: np.ndarray
    matrices: np.ndarray


def _checked_params(params: Any) -> np.ndarray:
    """Params (N, P) as float64, from the float32 record as stored (writer and reader agree), all finite."""
    p32 = np.asarray(params, dtype=np.float32)
    if p32.ndim != 2 or p32.shape[1] != NUM_PARAMS:
        raise ViewSpecError(f"view params must have shape (N, {NUM_PARAMS}) {PARAM_FIELDS}, got {p32.shape}")
    finite = np.isfinite(p32).all(1)
    if not finite.all():
        raise ViewSpecError(f"view params contain NaN/inf in view(s) {np.flatnonzero(~finite)[:10].tolist()}")
    return p32.astype(np.float64)


def _boxes(p: np.ndarray, src_hw: Any) -> np.ndarray:
    """(N, 4) int64 crop boxes (x0, y0, x1, y1) of checked params (N, P), each checked to fit its source."""
    hw = np.broadcast_to(np.asarray(src_hw, dtype=np.int64).reshape(-1, 2), (p.shape[0], 2))
    xywh = np.round(p[:, 0:4]).astype(np.int64)  # half to even, as Python's round()
    x0, y0 = xywh[:, 0], xywh[:, 1]
    x1, y1 = x0 + xywh[:, 2], y0 + xywh[:, 3]
    bad = ~((0 <= x0) & (x0 < x1) & (x1 <= hw[:, 1]) & (0 <= y0) & (y0 < y1) & (y1 <= hw[:, 0]))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ViewSpecError(f"crop box {(int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]))} does not fit in the "
                            f"source image (h, w) = {(int(hw[i, 0]), int(hw[i, 1]))}")
    return np.stack([x0, y0, x1, y1], 1)


def crop_boxes(params: Any, src_hw: Any) -> np.ndarray:
    """The crop boxes of `view_geometry` alone, (N, 4) int64 (x0, y0, x1, y1), for params (N, P) and source
    sizes (N, 2) or (2,): what a data worker needs to cut out the part of an image a view reads, without the
    view's matrices (about ten times the work)."""
    return _boxes(_checked_params(params), src_hw)


def view_geometry(params: Any, src_hw: Any, spec: ViewSpec) -> ViewGeometry:
    """`crop_box` + `reduce_factor` + `view_matrix` for params (N, P) and source sizes (N, 2) or (2,).

    The single definition: the per-view functions are its N = 1 case, so the Pillow reference and
    the batched torch renderer get bit-identical geometry.
    """
    p = _checked_params(params)
    boxes = _boxes(p, src_hw)
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    out_h, out_w = spec.size
    k = np.maximum(1, np.floor(np.minimum((x1 - x0) / out_w, (y1 - y0) / out_h))).astype(np.int64)
    reduced_hw = np.stack([-(-(y1 - y0) // k), -(-(x1 - x0) // k)], 1)
    matrices = _matrices(p, spec, k.astype(np.float64))[:, :2].copy()
    return ViewGeometry(boxes, k, reduced_hw, matrices)


def view_matrix(params: Any, src_hw: tuple[int, int], spec: ViewSpec) -> np.ndarray:
    """(2, 3) float64: output pixel coords → coords in the crop reduced by `reduce_factor` (Pillow `data`)."""
    return view_geometry(_as_params(params)[None], src_hw, spec).matrices[0]


def view_param_faults(params: np.ndarray, image_hw: np.ndarray, spec: ViewSpec) -> dict[str, np.ndarray]:
    """Vectorised range check of stored view records: params (..., P), image_hw broadcastable to (..., 2).

    Returns {problem: bool mask over the leading dims}; the single definition `verify` and
    `check_view_params` share.
    """
    p = np.asarray(params, np.float32)
    hw = np.asarray(image_hw)
    finite = np.isfinite(p).all(-1)
    q = np.where(finite[..., None], p, 0)
    x, y, w, h = (q[..., i] for i in range(4))
    ih, iw = hw[..., 0], hw[..., 1]
    flip = q[..., _IDX["flip"]]
    faults = {
        "NaN/inf in view params": ~finite,
        "crop box not integer": np.any(q[..., 0:4] != np.round(q[..., 0:4]), -1),
        "crop box outside the image": (x < 0) | (y < 0) | (w < 1) | (h < 1) | (x + w > iw) | (y + h > ih),
        "flip not 0/1": (flip != 0) & (flip != 1),
    }
    for op in GEO_OPS:
        lim = spec.max_abs(op)
        faults[f"{op} outside ±{lim:.4g}"] = np.abs(q[..., _IDX[op]]) > lim * (1 + 1e-5) + 1e-6
    slots = view_slots(q)
    op, mag, applied, negate = (slots[..., i] for i in range(len(SLOT_FIELDS)))
    allowed = np.array([RA_OPS.index(o) for o in spec.ra_ops] + [-1], np.float32)
    used = np.arange(MAX_SLOTS) < spec.ra_num_ops
    faults["slot op not in ViewSpec.ra_ops (or -1 past ra_num_ops)"] = np.any(
        np.where(used, ~np.isin(op, allowed[:-1]), op != -1), -1)
    faults[f"slot magnitude outside [0, {spec.ra_magnitude_max:g}]"] = np.any(
        used & ((mag < 0) | (mag > spec.ra_magnitude_max * (1 + 1e-6))), -1)
    faults["slot applied/negate not 0/1"] = np.any(((applied != 0) & (applied != 1)) | ((negate != 0) & (negate != 1)), -1)
    for name, field in GEO_FIELD.items():  # the rendered fields are the sum of the applied geometric slots
        hit = (op == RA_OPS.index(name)) & (applied == 1)
        value = np.where(hit, np.where(negate == 1, -1.0, 1.0) * mag / _LEVEL_DENOM * spec.op_max(field), 0.0).sum(-1)
        faults[f"{field} disagrees with the slots"] = np.abs(q[..., _IDX[field]] - value) > 1e-4 * (1 + np.abs(value))
    return faults


def check_view_params(params: Any, image_hw: tuple[int, int], spec: ViewSpec) -> list[str]:
    """Problems with one stored params record (empty list = fine)."""
    p = np.asarray(params, np.float32)
    if p.shape != (NUM_PARAMS,):
        return [f"shape {p.shape} != ({NUM_PARAMS},)"]
    return [name for name, mask in view_param_faults(p, np.asarray(image_hw), spec).items() if mask]


# --- rendering -----------------------------------------------------------------------------------

def render(image: Image.Image | np.ndarray, params: Any, spec: ViewSpec) -> np.ndarray:
    """Render one view: (h, w, 3) uint8. Same params + same decoded image ⇒ byte-identical pixels."""
    img = to_rgb(image, spec.fill)
    geo = view_geometry(_as_params(params)[None], (img.height, img.width), spec)  # box, k and matrix at once
    k, box, m = int(geo.factors[0]), tuple(int(v) for v in geo.boxes[0]), geo.matrices[0]
    src = img.reduce(k, box=box) if k > 1 else img.crop(box)
    out_h, out_w = spec.size
    out = src.transform((out_w, out_h), Image.Transform.AFFINE, data=tuple(float(v) for v in m.ravel()),
                        resample=_RESAMPLE[spec.interpolation], fillcolor=spec.fill)
    return np.asarray(out)


def render_mask(mask: np.ndarray, params: Any, spec: ViewSpec, fill: int = 0) -> np.ndarray:
    """Warp an integer (H, W) mask with the view's geometry: nearest neighbour, no box reduction."""
    a = np.asarray(mask)
    if a.ndim != 2:
        raise ViewSpecError(f"render_mask expects an (H, W) mask, got shape {a.shape}")
    if a.dtype == np.bool_ or a.dtype == np.uint8:
        img, back = Image.fromarray(a.astype(np.uint8), "L"), a.dtype
    elif np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
            raise ViewSpecError("render_mask: mask values must fit in int32")
        img, back = Image.fromarray(a.astype(np.int32), "I"), a.dtype
    else:
        raise ViewSpecError(f"render_mask expects an integer or bool mask, got dtype {a.dtype}")
    box = crop_box(params)
    _check_box(box, a.shape)
    m = _matrix(_as_params(params), spec, 1)[:2]
    out_h, out_w = spec.size
    out = img.crop(box).transform((out_w, out_h), Image.Transform.AFFINE, data=tuple(float(v) for v in m.ravel()),
                                  resample=Image.Resampling.NEAREST, fillcolor=int(fill))
    return np.asarray(out).astype(back)
