"""Per-sample pictures (paper Fig. 2b-d): the view the teacher saw, token-label map, confidence and
foreground maps, a Gumbel draw, and (with masks) the ground-truth object mask on the token grid."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from pipelines.report.charts import font

# A qualitative palette for small label sets (the first ten are the well-known "tab10" colours).
_BASE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
         (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
# Heat ramp for probabilities: dark blue (0) -> teal -> yellow (1); readable in greyscale print too.
_HEAT = np.array([(20, 20, 60), (40, 90, 150), (40, 160, 140), (170, 210, 60), (250, 240, 80)], np.float64)


def class_palette(num_classes: int) -> np.ndarray:
    """(C, 3) uint8 colours: tab10 first, then golden-ratio hues so neighbours differ."""
    cols = list(_BASE[:num_classes])
    for c in range(len(cols), num_classes):
        hue = (c * 0.6180339887) % 1.0
        cols.append(tuple(int(255 * x) for x in colorsys.hsv_to_rgb(hue, 0.55 + 0.4 * ((c // 7) % 2), 0.9)))
    return np.array(cols, np.uint8).reshape(num_classes, 3)


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


def captioned(img: Image.Image, caption: str, width: int) -> Image.Image:
    """`img` with a caption of up to three lines underneath, on a panel `width` wide."""
    f = font(12)
    lines = _wrap(caption, f, width - 6)[:3]
    out = Image.new("RGB", (width, img.height + 6 + 15 * len(lines)), "white")
    out.paste(img, ((width - img.width) // 2, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((3, img.height + 3 + 15 * i), line, fill="black", font=f)
    return out


def legend(entries: list[tuple[tuple[int, int, int], str]], width: int, title: str) -> Image.Image:
    f = font(12)
    out = Image.new("RGB", (width, 20 + 16 * len(entries)), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), title, fill="black", font=f)
    for i, (colour, text) in enumerate(entries):
        y = 20 + 16 * i
        draw.rectangle([4, y + 2, 14, y + 12], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((20, y), _wrap(text, f, width - 24)[0], fill="black", font=f)
    return out


def strip(panels: list[Image.Image], gap: int = 8) -> Image.Image:
    """Panels side by side, top-aligned."""
    w = sum(p.width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (w, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def _wrap(text: str, f, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if f.getlength(trial) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    return lines + ([cur] if cur else []) or [""]
