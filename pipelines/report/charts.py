"""Histogram bar charts drawn with Pillow (the project does not depend on matplotlib)."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]


def font(size: int = 13) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def bar_chart(edges: list[float], series: list[tuple[str, list[float], Colour]], title: str, xlabel: str,
              ylabel: str = "share", size: tuple[int, int] = (560, 320)) -> Image.Image:
    """Grouped bars: one group per bin (edges[i], edges[i+1]), one bar per series. Axes and tick labels
    only: the title (if any) is small and the legend and caption belong to the page around the picture."""
    w, h = size
    left, right, top, bottom = 58, 16, 34, 46
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    f, fs = font(14), font(11)
    if title:
        draw.text((left, 8), title, fill="black", font=f)
    nbins = len(edges) - 1
    ymax = max([max(v) for _, v, _ in series if len(v)] + [1e-9])
    ymax = _nice_ceiling(ymax)
    x0, x1, y0, y1 = left, w - right, top, h - bottom
    draw.line([(x0, y1), (x1, y1)], fill="black")
    draw.line([(x0, y0), (x0, y1)], fill="black")
    for i in range(5):  # y ticks
        val = ymax * i / 4
        y = y1 - (y1 - y0) * i / 4
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.line([(x0 + 1, y), (x1, y)], fill=(232, 232, 232)) if i else None
        draw.text((4, y - 7), f"{val:.2g}", fill="black", font=fs)
    group = (x1 - x0) / max(nbins, 1)
    bar = group * 0.8 / max(len(series), 1)
    for s, (_, values, colour) in enumerate(series):
        for b, v in enumerate(values):
            bx = x0 + b * group + group * 0.1 + s * bar
            by = min(y1 - 1, y1 - (y1 - y0) * (v / ymax))  # a non-zero share stays visible (>= 1 px)
            if v > 0:
                draw.rectangle([bx, by, max(bx, bx + bar - 1), y1 - 1], fill=colour)
    step = max(1, nbins // 5)
    for b in range(0, nbins + 1, step):  # x ticks at bin edges
        x = x0 + b * group
        draw.line([(x, y1), (x, y1 + 4)], fill="black")
        draw.text((x - 10, y1 + 6), f"{edges[b]:.2g}", fill="black", font=fs)
    draw.text(((x0 + x1) // 2 - 4 * len(xlabel) // 2, h - 18), xlabel, fill="black", font=fs)
    draw.text((x0 + 6, y0 - 2), ylabel, fill=(90, 90, 90), font=fs)
    return img


def _nice_ceiling(v: float) -> float:
    """Round an axis maximum up to 1, 2 or 5 × 10^k so tick labels are short."""
    exp = math.floor(math.log10(v))
    for m in (1, 2, 5, 10):
        if m * 10 ** exp >= v:
            return m * 10 ** exp
    return 10 ** (exp + 1)
