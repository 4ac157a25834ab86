"""Fetch tar members (image bytes, masks) by `__key__` from WebDataset shards, and class names."""
from __future__ import annotations

from pathlib import Path

import webdataset as wds
from timm.data import ImageNetInfo

from labelstore.shard_format import image_field


def read_fields(urls: list[str], keys: set[str], fields: tuple[str, ...]) -> dict[str, dict[str, bytes]]:
    """{key: {field: bytes}} for every wanted key found in `urls` (only the named fields are kept)."""
    found: dict[str, dict[str, bytes]] = {}
    if not keys or not urls:
        return found
    ds = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False)
    for sample in ds:
        key = sample["__key__"]
        if key in keys:
            found[key] = {f: sample[f] for f in fields if f in sample}
            if len(found) == len(keys):
                break
    return found


def image_bytes(fields: dict[str, bytes]) -> tuple[bytes, str] | None:
    """(image bytes, extension) by the shard contract's image field rule; None without an image."""
    ext = image_field(fields)
    return (fields[ext], ext) if ext else None


def class_names(num_classes: int, classes_file: str | None = None) -> list[str]:
    """Names from a file (one per line), ImageNet names for 1000 classes, else "class i"."""
    if classes_file:
        path = Path(classes_file)
        if not path.exists():
            raise FileNotFoundError(f"classes file {path} not found")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"classes file {path} lists {len(names)} names but the labeler has {num_classes} classes")
        return names
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    return [f"class {i}" for i in range(num_classes)]
