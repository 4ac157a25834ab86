"""The built-in demo dataset: a synthetic 10-class task with per-pixel ground-truth masks (no download).

Each image is a crop of one of the real photos scikit-image ships (the background), 0-2 smaller
distractor objects of other classes, and one object of the image class on top (shape from
`demo_shapes`, random colour, texture, scale 15-60 % of the side, position, rotation). The mask says
where the object is: 0 background, 1 object of the image class, 2 distractor. Because masks are exact,
token-label quality can be *measured* (foreground accuracy / IoU), which real ImageNet cannot offer.

Everything is a pure function of (seed, split, index): `make_sample` draws from
`np.random.SeedSequence(seed, spawn_key=(split_code, index))`, so shard size and write order never change
a pixel. Output layout (see `write_demo_data`)::

    OUT/dataset.json                       manifest: spec, class names, shard lists per split / corruption
    OUT/classes.txt                        one class name per line (for `stl-labels report --classes`)
    OUT/train/train-000000.tar ...         WebDataset: <key>.jpg, <key>.cls, <key>.mask (PNG, mode L)
    OUT/val/val-000000.tar ...
    OUT/val-c/<corruption>/<severity>/val-000000.tar ...   corrupted copies of the first val images
                                                            (same keys and classes; jpg + cls only)

The mask member is named `mask` (not `mask.png`) so no reader ever mistakes it for the image.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from labelstore.masks import MASK_DISTRACTOR, MASK_OBJECT, encode_mask
from labelstore.shard_writer import member_mtime
from pipelines.demo.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from pipelines.demo.shapes import CLASS_NAMES, SHAPES

FORMAT = "stl-demo-data"
FORMAT_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "val-c": 2}
TEXTURES = ("flat", "stripes", "checker", "gradient", "spots")
# Photos bundled inside the scikit-image wheel (loading them never touches the network).
BACKGROUND_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                     "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
                     "text", "clock", "cell")


@dataclass(frozen=True)
class DemoDataSpec:
    """How the demo dataset is drawn. Same spec ⇒ identical samples (image, mask, class)."""

    seed: int = 0
    image_size: int = 64
    num_train: int = 4000
    num_val: int = 1000
    num_val_corrupt: int = 500          # first N val images get corrupted copies (0 = none)
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = SEVERITIES
    samples_per_shard: int = 500
    jpeg_quality: int = 90
    object_scale: tuple[float, float] = (0.15, 0.60)   # object size as a fraction of the image side
    max_distractors: int = 2
    textures: tuple[str, ...] = TEXTURES
    # "random": any colour (the class is the shape alone); "class": each class has its own hue band (±0.03 of
    # the hue circle), an easier variant that a tiny CPU model learns within minutes (used by `make demo`).
    colors: str = "random"

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= 128:
            raise ValueError(f"demo-data image_size must be in 32..128 px, got {self.image_size}")
        for name in ("num_train", "num_val", "num_val_corrupt"):
            if getattr(self, name) < 0:
                raise ValueError(f"demo-data {name} must be >= 0, got {getattr(self, name)}")
        if self.num_val_corrupt > self.num_val:
            raise ValueError(f"demo-data num_val_corrupt ({self.num_val_corrupt}) exceeds num_val ({self.num_val})")
        if self.samples_per_shard < 1:
            raise ValueError(f"demo-data samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"demo-data jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        lo, hi = self.object_scale
        if not 0.05 <= lo <= hi <= 1.0:
            raise ValueError(f"demo-data object_scale must satisfy 0.05 <= lo <= hi <= 1, got {self.object_scale}")
        if not 0 <= self.max_distractors <= 4:
            raise ValueError(f"demo-data max_distractors must be in 0..4, got {self.max_distractors}")
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        if bad:
            raise ValueError(f"demo-data corruptions {bad} unknown; choose from {sorted(CORRUPTIONS)}")
        if any(s not in SEVERITIES for s in self.severities):
            raise ValueError(f"demo-data severities must be within 1..5, got {self.severities}")
        if self.colors not in ("random", "class"):
            raise ValueError(f"demo-data colors must be 'random' or 'class', got {self.colors!r}")
        bad = [t for t in self.textures if t not in TEXTURES]
        if bad or not self.textures:
            raise ValueError(f"demo-data textures {list(self.textures)} invalid; choose from {list(TEXTURES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DemoDataSpec":
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tuples})


@dataclass(frozen=True)
class ObjectParams:
    """One pasted object: class, pose (pixels, degrees) and appearance."""

    cls: int
    cx: float
    cy: float
    radius: float
    angle_deg: float
    color1: tuple[int, int, int]
    color2: tuple[int, int, int]
    texture: str
    freq: float
    phase: float


@dataclass(frozen=True)
class DemoSample:
    key: str
    label: int
    image: np.ndarray                 # (H, W, 3) uint8
    mask: np.ndarray                  # (H, W) uint8: 0 background, 1 object, 2 distractor
    objects: tuple[ObjectParams, ...] = field(default=())   # distractors first, the class object last


# --- backgrounds -------------------------------------------------------------------------------------

_PHOTO_CACHE: dict[int, list[Image.Image]] = {}


def background_photos(image_size: int) -> list[Image.Image]:
    """The bundled photos as RGB, pre-shrunk so their short side is 4× the image side (fast crops)."""
    if image_size not in _PHOTO_CACHE:
        import skimage.data  # heavy-ish; only the data generator needs it

        photos = []
        for name in BACKGROUND_PHOTOS:
            arr = np.asarray(getattr(skimage.data, name)())
            img = Image.fromarray(arr).convert("RGB")
            short = min(img.size)
            target = 4 * image_size
            if short > target:
                img = img.resize((round(img.width * target / short), round(img.height * target / short)),
                                 Image.Resampling.BOX)
            photos.append(img)
        _PHOTO_CACHE[image_size] = photos
    return _PHOTO_CACHE[image_size]


def draw_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop (25-100 % of the short side) of a random photo, resized, maybe flipped/tinted."""
    photos = background_photos(size)
    photo = photos[int(rng.integers(len(photos)))]
    side = rng.uniform(0.25, 1.0) * min(photo.size)
    x0 = rng.uniform(0, photo.width - side)
    y0 = rng.uniform(0, photo.height - side)
    img = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    arr = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    # A mild random tint so the many grey photos do not make "grey" a background cue.
    tint = rng.uniform(0.75, 1.25, size=3).astype(np.float32)
    return np.clip(arr * tint, 0, 255)


# --- objects -----------------------------------------------------------------------------------------

def _random_color(rng: np.random.Generator, hue: float | None = None) -> tuple[int, int, int]:
    """A saturated colour; with `hue` (0..1) one near that hue (±0.03), else any hue."""
    h = rng.integers(256) if hue is None else int(round(((hue + rng.uniform(-0.03, 0.03)) % 1.0) * 255))
    hsv = np.array([[[h, rng.integers(128, 256), rng.integers(100, 256)]]], dtype=np.uint8)
    return tuple(int(c) for c in np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))[0, 0])


def draw_object(rng: np.random.Generator, cls: int, scale: float, size: int, textures: tuple[str, ...],
                colors: str = "random") -> ObjectParams:
    radius = scale * size / 2.0
    lo, hi = radius, size - radius
    hue = cls / len(CLASS_NAMES) if colors == "class" else None
    return ObjectParams(
        cls=cls, cx=float(rng.uniform(lo, hi)), cy=float(rng.uniform(lo, hi)), radius=float(radius),
        angle_deg=float(rng.uniform(0, 360)), color1=_random_color(rng, hue), color2=_random_color(rng, hue),
        texture=str(textures[int(rng.integers(len(textures)))]), freq=float(rng.uniform(2.0, 5.0)),
        phase=float(rng.uniform(0, 2 * np.pi)),
    )


def _texture(obj: ObjectParams, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mixing weight of color2 in [0, 1], in the object frame so it rotates with the object."""
    if obj.texture == "flat":
        return np.zeros_like(u)
    if obj.texture == "stripes":
        return (np.sin(obj.freq * np.pi * u + obj.phase) > 0).astype(np.float64)
    if obj.texture == "checker":
        return ((np.floor(obj.freq * (u + 2)) + np.floor(obj.freq * (v + 2))) % 2).astype(np.float64)
    if obj.texture == "gradient":
        return np.clip((u * np.cos(obj.phase) + v * np.sin(obj.phase) + 1) / 2, 0, 1)
    # spots: a blob pattern from two crossed sinusoids
    return (np.sin(obj.freq * np.pi * u + obj.phase) * np.sin(obj.freq * np.pi * v) > 0.3).astype(np.float64)


def paint_object(canvas: np.ndarray, mask: np.ndarray, obj: ObjectParams, mask_value: int) -> None:
    """Composite `obj` onto `canvas` (H, W, 3 float) in place and set `mask` where it covers > half a pixel.

    Only the object's bounding box is evaluated. Coverage = clip(0.5 - sdf_px, 0, 1) anti-aliases edges.
    """
    size_h, size_w = mask.shape
    reach = 1.1 * obj.radius + 1.0          # every shape lies within 1.07 units of its centre
    x0, x1 = max(0, int(obj.cx - reach)), min(size_w, int(np.ceil(obj.cx + reach)))
    y0, y1 = max(0, int(obj.cy - reach)), min(size_h, int(np.ceil(obj.cy + reach)))
    if x1 <= x0 or y1 <= y0:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = xs + 0.5 - obj.cx, ys + 0.5 - obj.cy    # pixel centres (pixel i spans [i, i+1))
    c, s = np.cos(np.deg2rad(obj.angle_deg)), np.sin(np.deg2rad(obj.angle_deg))
    u, v = (c * dx + s * dy) / obj.radius, (-s * dx + c * dy) / obj.radius
    sdf_px = SHAPES[CLASS_NAMES[obj.cls]](u, v) * obj.radius
    cover = np.clip(0.5 - sdf_px, 0.0, 1.0)[..., None]
    t = _texture(obj, u, v)[..., None]
    color = (1 - t) * np.array(obj.color1, np.float64) + t * np.array(obj.color2, np.float64)
    region = canvas[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1] = region * (1 - cover) + color * cover
    mask[y0:y1, x0:x1][sdf_px < 0] = mask_value


def make_sample(spec: DemoDataSpec, split: str, index: int) -> DemoSample:
    """Sample `index` of `split`, a pure function of (spec, split, index)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown demo-data split {split!r}; choose from {list(SPLIT_CODES)}")
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(SPLIT_CODES[split], index)))
    size = spec.image_size
    num_classes = len(CLASS_NAMES)
    label = index % num_classes            # balanced classes; order is shuffled by the readers
    canvas = draw_background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    scale = rng.uniform(*spec.object_scale)
    others = [c for c in range(num_classes) if c != label]
    objects = []
    for _ in range(int(rng.integers(spec.max_distractors + 1))):
        d_cls = others[int(rng.integers(len(others)))]
        d_scale = max(0.08, scale * rng.uniform(0.35, 0.7))
        objects.append(draw_object(rng, d_cls, d_scale, size, spec.textures, spec.colors))
    objects.append(draw_object(rng, label, scale, size, spec.textures, spec.colors))
    for i, obj in enumerate(objects):
        paint_object(canvas, mask, obj, MASK_OBJECT if i == len(objects) - 1 else MASK_DISTRACTOR)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return DemoSample(key=f"{split}-{index:06d}", label=label, image=image, mask=mask, objects=tuple(objects))


# --- encoding and shards ---------------------------------------------------------------------------

def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_shards(records: Iterator[dict], count: int, directory: Path, prefix: str, per_shard: int) -> list[str]:
    """Write `count` records into shards of `per_shard`; returns the shard file names, in order."""
    import webdataset as wds  # loads torch: only when shards are written, so `python -m pipelines.demo --help` stays quick

    if count == 0:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(directory / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0,
                         mtime=member_mtime()) as writer:
        for rec in records:
            writer.write(rec)
    # Named from the count, not globbed, so leftovers of an unfinished earlier write are never listed.
    return [f"{prefix}-{i:06d}.tar" for i in range(-(-count // per_shard))]


def _shard_entry(out: Path, sub: Path, names: list[str], count: int) -> dict:
    rel = sub.relative_to(out)
    return {"dir": str(rel), "shards": names, "num_samples": count}


def write_demo_data(out: str | Path, spec: DemoDataSpec,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Write the whole dataset under `out` and return the manifest (also saved as dataset.json).

    The manifest is written last, so a directory without dataset.json is an unfinished write.
    """
    out = Path(out)
    if (out / "dataset.json").exists():
        raise FileExistsError(f"demo-data: {out / 'dataset.json'} already exists; choose an empty directory")
    say = progress or (lambda msg: None)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "spec": spec.to_dict(),
                "classes": list(CLASS_NAMES), "splits": {}, "corrupt": {}}
    val_images: list[tuple[str, int, np.ndarray]] = []
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        t0 = time.perf_counter()

        def records(split=split, count=count):
            for i in range(count):
                s = make_sample(spec, split, i)
                if split == "val" and i < spec.num_val_corrupt:
                    val_images.append((s.key, s.label, s.image))
                yield {"__key__": s.key, "jpg": encode_jpeg(s.image, spec.jpeg_quality), "cls": s.label,
                       "mask": encode_mask(s.mask)}

        names = _write_shards(records(), count, out / split, split, spec.samples_per_shard)
        manifest["splits"][split] = _shard_entry(out, out / split, names, count)
        say(f"{split}: {count} images in {len(names)} shards ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    for ci, name in enumerate(spec.corruptions):
        manifest["corrupt"][name] = {}
        for sev in spec.severities:
            def records(ci=ci, name=name, sev=sev):
                for i, (key, label, image) in enumerate(val_images):
                    rng = np.random.default_rng(
                        np.random.SeedSequence(spec.seed, spawn_key=(SPLIT_CODES["val-c"], ci, sev, i)))
                    yield {"__key__": key, "jpg": encode_jpeg(corrupt(image, name, sev, rng), spec.jpeg_quality),
                           "cls": label}

            sub = out / "val-c" / name / str(sev)
            names = _write_shards(records(), len(val_images), sub, "val", spec.samples_per_shard)
            manifest["corrupt"][name][str(sev)] = _shard_entry(out, sub, names, len(val_images))
    if spec.corruptions and val_images:
        say(f"val-c: {len(val_images)} images x {len(spec.corruptions)} corruptions x "
            f"{len(spec.severities)} severities ({time.perf_counter() - t0:.1f} s)")
    (out / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    (out / "dataset.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# --- reading the manifest --------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoDataset:
    """A written demo dataset: absolute shard paths per split and per (corruption, severity)."""

    root: Path
    spec: DemoDataSpec
    classes: tuple[str, ...]
    splits: dict          # split -> (list of shard paths, num_samples)
    corrupt: dict         # corruption -> {severity: (list of shard paths, num_samples)}

    @classmethod
    def load(cls, root: str | Path) -> "DemoDataset":
        root = Path(root).resolve()
        path = root / "dataset.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `stl-labels demo-data {root}` first "
                                    "(a directory without it is an unfinished write)")
        m = json.loads(path.read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"{path}: format {m.get('format')!r} is not {FORMAT!r}")

        def paths(e):
            return [str(root / e["dir"] / n) for n in e["shards"]], int(e["num_samples"])

        return cls(root=root, spec=DemoDataSpec.from_dict(m["spec"]), classes=tuple(m["classes"]),
                   splits={k: paths(e) for k, e in m["splits"].items()},
                   corrupt={c: {int(s): paths(e) for s, e in sev.items()} for c, sev in m["corrupt"].items()})

    def shards(self, split: str) -> list[str]:
        if split not in self.splits:
            raise KeyError(f"{self.root}/dataset.json has no split {split!r}; it has {list(self.splits)}")
        return self.splits[split][0]

    def pattern(self, split: str) -> str:
        """The split's shards as one brace pattern (`.../train-{000000..000007}.tar`), as users type them."""
        urls = self.shards(split)
        if len(urls) == 1:
            return urls[0]
        head = urls[0][: -len("000000.tar")]
        return f"{head}{{000000..{len(urls) - 1:06d}}}.tar"

