"""Per-sample pictures (paper Fig. 2b-d): the view the teacher saw, token-label map, confidence and
foreground maps, a Gumbel draw, and (with masks) the ground-truth object mask on the token grid.

Pictures only: their captions and legends are HTML in index.html (`page.py`), so they stay readable at any
window width."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Kelly's 22 colours of maximum contrast (K. L. Kelly, 1965) without white, black and grey (grey is the
# views' fill), thinned so any two differ by a CIELAB distance of at least 25: 16 colours that are easy to
# tell apart. A picture colours its classes in order of frequency; classes past the 16th share OTHER, and
# the legend says how many they are.
PALETTE = [(243, 195, 0), (135, 86, 146), (243, 132, 0), (161, 202, 241), (190, 0, 50), (194, 178, 128),
           (0, 136, 86), (230, 143, 172), (0, 103, 165), (249, 147, 121), (179, 68, 108), (136, 45, 23),
           (141, 182, 0), (101, 69, 34), (226, 88, 34), (43, 61, 38)]
OTHER = (0, 0, 0)  # classes past the palette
# Heat ramp for probabilities: dark blue (0) -> teal -> yellow (1); readable in greyscale print too.
_HEAT = np.array([(20, 20, 60), (40, 90, 150), (40, 160, 140), (170, 210, 60), (250, 240, 80)], np.float64)


def class_colours(ranked: list[int], num_classes: int) -> np.ndarray:
    """(C, 3) uint8: PALETTE[i] for the i-th class of `ranked` (most frequent first), OTHER for the rest."""
    cols = np.tile(np.array(OTHER, np.uint8), (num_classes, 1))
    for i, c in enumerate(ranked[:len(PALETTE)]):
        cols[c] = PALETTE[i]
    return cols


def hex_colour(rgb) -> str:
    return "#%02x%02x%02x" % tuple(int(v) for v in rgb)


HEAT_STOPS = _HEAT  # the ramp's colours, for the page's CSS gradient legend


def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through the heat ramp."""
    x = np.clip(np.asarray(values, np.float64), 0, 1) * (len(_HEAT) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_HEAT) - 2)
    t = (x - lo)[..., None]
    return np.rint(_HEAT[lo] * (1 - t) + _HEAT[lo + 1] * t).astype(np.uint8)


def upscale(grid_rgb: np.ndarray, size: int, lines: bool = True) -> Image.Image:
    """Token grid (gh, gw, 3) -> picture `size` px wide with crisp token cells and faint grid lines."""
    gh, gw = grid_rgb.shape[:2]
    img = Image.fromarray(grid_rgb).resize((size, round(size * gh / gw)), Image.Resampling.NEAREST)
    if not lines:
        return img
    lined = img.copy()
    draw = ImageDraw.Draw(lined)
    for i in range(1, gw):
        draw.line([(i * img.width / gw, 0), (i * img.width / gw, img.height)], fill="white")
    for j in range(1, gh):
        draw.line([(0, j * img.height / gh), (img.width, j * img.height / gh)], fill="white")
    return Image.blend(img, lined, 0.3)  # faint lines: token cells stay visible without hiding colours


def resized(view: np.ndarray, size: int) -> Image.Image:
    """The view at `size` px wide (bilinear: small views stay readable)."""
    return Image.fromarray(view).resize((size, round(size * view.shape[0] / view.shape[1])), Image.Resampling.BILINEAR)


def overlay(view: np.ndarray, grid_rgb: np.ndarray, size: int, alpha: float = 0.6, lines: bool = True) -> Image.Image:
    """Token colours (or any coarser/equal RGB map) blended over the view, both shown `size` px wide."""
    base = resized(view, size)
    top = upscale(grid_rgb, size, lines).resize(base.size, Image.Resampling.NEAREST)
    return Image.blend(base, top, alpha)
