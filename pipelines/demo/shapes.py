"""The ten object classes of the demo dataset, as signed distance functions (SDFs).

Each shape is a pure function of object-frame coordinates (u, v) (numpy arrays, the shape fills roughly
the unit disc, never reaching beyond radius 1.07) returning the signed distance to its outline in the same units: negative inside. An SDF
gives both the exact ground-truth mask (sdf < 0) and anti-aliased edges (coverage = 0.5 - sdf in
pixels) from one evaluation, with no rasteriser and no per-pixel Python loop.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def polygon_sdf(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance from points (u, v) to the closed polygon `verts` (n, 2); negative inside.

    Distance = min over edges of the point-segment distance; inside = odd number of crossings of a ray
    towards +u (even-odd rule), so concave outlines (star, arrow, T) work too.
    """
    a = verts[None, :, :]
    b = np.roll(verts, -1, axis=0)[None, :, :]
    p = np.stack([u.ravel(), v.ravel()], axis=-1)[:, None, :]
    e, w = b - a, p - a
    t = np.clip((w * e).sum(-1) / (e * e).sum(-1), 0.0, 1.0)
    dist = np.linalg.norm(w - e * t[..., None], axis=-1).min(axis=1)
    ay, by, py = a[..., 1], b[..., 1], p[..., 1]
    straddles = (ay > py) != (by > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = a[..., 0] + (py - ay) * (b[..., 0] - a[..., 0]) / (by - ay)
    inside = ((straddles & (p[..., 0] < x_cross)).sum(axis=1) % 2) == 1
    return np.where(inside, -dist, dist).reshape(u.shape)


def _regular(n: int, radius: float, phase_deg: float = 90.0) -> np.ndarray:
    ang = np.deg2rad(phase_deg) + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=-1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    ang = np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=-1)


_TRIANGLE = _regular(3, 1.0)
_HEXAGON = _regular(6, 0.95, 0.0)
_STAR = _star(5, 1.0, 0.45)
_PLUS = np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1],
                  [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]], dtype=float)
_ARROW = np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.65], [1, 0], [0.15, 0.65], [0.15, 0.22], [-1, 0.22]],
                  dtype=float)
_TEE = np.array([[-0.75, -0.75], [0.75, -0.75], [0.75, -0.38], [0.22, -0.38], [0.22, 0.95], [-0.22, 0.95],
                 [-0.22, -0.38], [-0.75, -0.38]], dtype=float)


def disk(u, v):
    return np.hypot(u, v) - 0.9


def square(u, v):
    # Box SDF: outside distance from the clamped excess, inside the (negative) largest excess.
    qx, qy = np.abs(u) - 0.75, np.abs(v) - 0.75
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def triangle(u, v):
    return polygon_sdf(u, v, _TRIANGLE)


def star(u, v):
    return polygon_sdf(u, v, _STAR)


def plus(u, v):
    return polygon_sdf(u, v, _PLUS)


def ring(u, v):
    return np.abs(np.hypot(u, v) - 0.72) - 0.22


def hexagon(u, v):
    return polygon_sdf(u, v, _HEXAGON)


def crescent(u, v):
    # Disc minus an offset disc: max(d_outer, -d_inner) is the SDF bound of the set difference.
    return np.maximum(np.hypot(u, v) - 0.95, -(np.hypot(u - 0.45, v) - 0.75))


def arrow(u, v):
    return polygon_sdf(u, v, _ARROW)


def tee(u, v):
    return polygon_sdf(u, v, _TEE)


SHAPES: dict[str, ShapeFn] = {
    "disk": disk, "square": square, "triangle": triangle, "star": star, "plus": plus,
    "ring": ring, "hexagon": hexagon, "crescent": crescent, "arrow": arrow, "tee": tee,
}
CLASS_NAMES: tuple[str, ...] = tuple(SHAPES)
