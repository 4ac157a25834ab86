"""`stl-labels shard`: an ImageFolder tree (or existing `jpg`+`cls` shards) → WebDataset shards.

Keys are stable (`<class folder>/<file stem>`), class ids follow the sorted class folder names (as
torchvision's ImageFolder does) and `classes.txt` (one name per line, line i = class id i) is written
beside the shards. Image bytes are copied, never re-encoded. Each shard is written to a temporary
name and renamed when complete, so a crash never leaves a short shard that looks finished (which is
why this does not use `webdataset.ShardWriter`). The tar members are written with the standard library:
webdataset's `TarWriter` would load torch, and labelstore stays torch-free.
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from labelstore.shard_format import IMAGE_EXTS, expand_shard_urls, iter_shard

# file suffix -> the field it is stored under (the contract's image fields; .jpeg files become `jpg`)
FOLDER_IMAGE_EXTS = {f".{ext}": "jpg" if ext == "jpeg" else ext for ext in IMAGE_EXTS}


@dataclass(frozen=True)
class ShardEntry:
    key: str
    ext: str
    data: bytes | None  # None: read lazily from `path`
    path: Path | None
    label: int

    def payload(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


@dataclass(frozen=True)
class ShardingReport:
    shards: list[str]
    num_samples: int
    classes: list[str]
    skipped: list[str]  # files or keys not written, with the reason


def scan_image_folder(root: str | Path) -> tuple[list[str], list[ShardEntry], list[str]]:
    """(classes, entries sorted by key, skipped files) for an ImageFolder tree `root/<class>/<image>`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    entries: dict[str, ShardEntry] = {}
    skipped: list[str] = []
    for class_id, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if not path.is_file():
                continue
            ext = FOLDER_IMAGE_EXTS.get(path.suffix.lower())
            if ext is None:
                skipped.append(f"{path}: not an image ({'/'.join(sorted(FOLDER_IMAGE_EXTS))})")
                continue
            rel = path.relative_to(root / name).with_suffix("")
            # webdataset splits a member name at the first dot of its basename: no dots in keys.
            key = f"{name}/{rel.as_posix()}".replace(".", "_")
            if key in entries:
                raise ValueError(f"two images map to the same key {key!r}: {entries[key].path} and {path}")
            entries[key] = ShardEntry(key=key, ext=ext, data=None, path=path, label=class_id)
    return classes, [entries[k] for k in sorted(entries)], skipped


def scan_shards(pattern: str) -> tuple[list[ShardEntry], list[str]]:
    """Entries of existing WebDataset shards (`jpg`/`png`/… + `cls`), in shard order."""
    entries, skipped = [], []
    for url in expand_shard_urls(pattern):
        for sample in iter_shard(url):
            if sample.error or sample.image is None:
                skipped.append(f"{url} key {sample.key}: {sample.error}")
                continue
            ext = "jpg" if sample.image_ext == "jpeg" else sample.image_ext
            entries.append(ShardEntry(sample.key, ext, sample.image, None, sample.label))
    return entries, skipped


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def member_mtime() -> int:
    """The time stamped on tar members: whole seconds. A fractional one does not fit the ustar header, so
    tarfile (and webdataset's writers, given no `mtime`) add a pax header block pair to every member: about
    2 kB more per sample and a slower read (docs/benchmarks.md)."""
    return int(time.time())


def write_tar_sample(tar: tarfile.TarFile, key: str, fields: dict[str, bytes]) -> None:
    """Append one sample: a member `<key>.<ext>` per field, in the given order (readable by webdataset)."""
    now = member_mtime()
    for ext, data in fields.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), now, 0o444
        tar.addfile(info, io.BytesIO(data))


def write_shards(entries: Iterable[ShardEntry], out_pattern: str, samples_per_shard: int) -> list[str]:
    """Write `entries` as consecutive shards named `out_pattern % index`; returns the paths written."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if "%" not in out_pattern:
        raise ValueError(f"output pattern {out_pattern!r} needs a %-index, e.g. out/train-%06d.tar")
    paths = []
    for index, chunk in enumerate(_chunks(list(entries), samples_per_shard)):
        path = Path(out_pattern % index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with tarfile.open(tmp, "w") as tar:
            for e in chunk:
                fields = {e.ext: e.payload()}
                if e.label >= 0:
                    fields["cls"] = str(e.label).encode()
                write_tar_sample(tar, e.key, fields)
        os.replace(tmp, path)
        paths.append(str(path))
    return paths


def shard_dataset(source: str, out_pattern: str, samples_per_shard: int, shuffle_seed: int | None = 0) -> ShardingReport:
    """ImageFolder directory or existing shard pattern → new shards (+ classes.txt for ImageFolder).

    `shuffle_seed` mixes classes across shards (a fixed seed keeps the result reproducible);
    None keeps sorted key order.
    """
    classes: list[str] = []
    if Path(source).is_dir():
        classes, entries, skipped = scan_image_folder(source)
    else:
        entries, skipped = scan_shards(source)
    if not entries:
        raise ValueError(f"no images found in {source} (image types: {', '.join(IMAGE_EXTS)})")
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    paths = write_shards(entries, out_pattern, samples_per_shard)
    if classes:
        (Path(paths[0]).parent / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return ShardingReport(shards=paths, num_samples=len(entries), classes=classes, skipped=skipped)
