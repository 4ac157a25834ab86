"""`stl-labels bench shards`: WebDataset shards of real-looking JPEGs for `bench generate`.

Each sample is a random crop of one of scikit-image's bundled photos (the `demo` extra), resized to a
random size in [min_size, max_size] per side, randomly mirrored and saved as a JPEG of quality 75–95:
ImageNet-like decode and render costs without a dataset download. Shards are written in parallel
threads (Pillow releases the GIL while resizing and encoding), each to a temp file renamed when done.
"""
from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from labelstore.shard_writer import write_tar_sample

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "brick", "grass", "gravel", "coins", "moon", "page")


def load_photos() -> list[Image.Image]:
    """The bundled scikit-image photos as RGB Pillow images (grey ones converted)."""
    try:
        import skimage.data
    except ImportError as e:
        raise ValueError("bench shards needs scikit-image (pip install 'stl-token-labels[demo]')") from e
    photos = []
    for name in PHOTOS:
        try:
            photos.append(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB"))
        except Exception:  # noqa: BLE001 - a photo that needs a download: use the others
            continue
    if not photos:
        raise ValueError("bench shards: none of scikit-image's bundled photos could be loaded")
    return photos


def random_jpeg(photos: list[Image.Image], rng: np.random.Generator, min_size: int, max_size: int) -> bytes:
    """One JPEG: a random crop of a random photo, resized to a random size, maybe mirrored."""
    src = photos[int(rng.integers(len(photos)))]
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    sw, sh = src.size
    scale = min(sw / w, sh / h) * float(rng.uniform(0.35, 1.0))  # crop of the target's aspect ratio
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    img = src.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def _write_shard(path: Path, index: int, per_shard: int, photos: list[Image.Image], min_size: int, max_size: int,
                 seed: int, num_classes: int) -> str:
    rng = np.random.default_rng([seed, index])
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for j in range(per_shard):
            label = str(int(rng.integers(num_classes))).encode()
            write_tar_sample(tar, f"bench-{index:06d}-{j:06d}", {"jpg": random_jpeg(photos, rng, min_size, max_size),
                                                                   "cls": label})
    os.replace(tmp, path)
    return str(path)


def make_bench_shards(out: str | Path, shards: int = 8, per_shard: int = 500, min_size: int = 300,
                      max_size: int = 640, seed: int = 0, num_classes: int = 1000, threads: int | None = None) -> list[str]:
    """Write `shards` tars of `per_shard` JPEGs to OUT/bench-%06d.tar; returns their paths."""
    if shards < 1 or per_shard < 1:
        raise ValueError(f"bench shards: --shards and --per-shard must be >= 1, got {shards} and {per_shard}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"bench shards: need 8 <= --min-size <= --max-size, got {min_size} and {max_size}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    paths = [root / f"bench-{i:06d}.tar" for i in range(shards)]
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda i: _write_shard(paths[i], i, per_shard, photos, min_size, max_size, seed,
                                                    num_classes), range(shards)))
