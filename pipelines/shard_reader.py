"""Read every sample of a WebDataset tar shard, in order, bad ones included.

Why not `webdataset.WebDataset`: it drops samples it cannot decode and a tar truncated at a header
ends silently (docs/design.md "Library behaviour"), so positions would shift. The label store's rows are
`first_row(shard) + position in shard`, so the labeler must see every sample, keep its place, and
know that the archive really ended. We keep webdataset's naming rules (`base_plus_ext`, lower-case
extensions) and its URL handling (brace expansion, `pipe:`), and use fsspec for other URLs.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass
from typing import IO, Iterator, Sequence

from webdataset.tariterators import base_plus_ext

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_JSON_FIELDS = ("label", "cls", "class", "class_id")


class ShardReadError(RuntimeError):
    """A shard that cannot be read completely (missing, unreadable or truncated tar)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"shard {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class ShardSample:
    """One sample = the tar members sharing a `__key__`; `error` says why it cannot be labelled."""

    key: str
    image: bytes | None
    image_ext: str | None
    label: int  # -1 when the shard has no `cls`/`json` label for it
    error: str | None = None

    @property
    def image_name(self) -> str:
        return f"{self.key}.{self.image_ext}" if self.image_ext else self.key


def expand_shard_urls(patterns: str | Sequence[str]) -> list[str]:
    """Brace patterns (`data/train-{000000..000009}.tar`) → URLs, in order, duplicates removed."""
    import webdataset as wds

    items = [patterns] if isinstance(patterns, str) else list(patterns)
    urls: list[str] = []
    for item in items:
        urls.extend(wds.shardlists.expand_urls(item))
    return list(dict.fromkeys(u for u in urls if u))


def open_url(url: str) -> IO[bytes]:
    """Open a shard for streaming: `pipe:` via webdataset, anything else via fsspec (local, s3, http…)."""
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


class _ByteCounter(io.RawIOBase):
    """Pass-through reader that counts bytes and remembers where the last non-zero byte was.

    A tar ends with zero blocks after the last member; tarfile's stream mode stops without an error
    when the data simply runs out at a header, so we check the end marker ourselves.
    """

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.pos = 0
        self.last_nonzero = -1

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        used = len(data.rstrip(b"\0"))
        if used:
            self.last_nonzero = self.pos + used - 1
        self.pos += len(data)
        return data


def iter_tar_members(raw: IO[bytes], url: str, read_data: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) for every regular file member, in archive order; raises ShardReadError at a bad end."""
    stream: IO[bytes] = raw
    if url.endswith((".gz", ".tgz")):
        stream = gzip.GzipFile(fileobj=raw)  # a truncated gzip raises EOFError below
    counter = _ByteCounter(stream)
    try:
        with tarfile.open(fileobj=counter, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                data = tar.extractfile(info).read() if read_data else None
                yield info.name, data
            end = tar.offset  # where the end-of-archive zero block must start
        while counter.read(1 << 20):
            pass
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise ShardReadError(url, f"unreadable or truncated tar ({type(e).__name__}: {e})") from e
    if counter.pos < end + tarfile.BLOCKSIZE or counter.last_nonzero >= end:
        raise ShardReadError(url, f"truncated or corrupt tar: no end-of-archive block after byte {end} "
                                  f"(file has {counter.pos} bytes)")


def parse_label(fields: dict[str, bytes | None], key: str) -> tuple[int, str | None]:
    """Class id from `cls` (text int) or `json` ({"label": int} or a bare int); -1 when absent."""
    try:
        if fields.get("cls") is not None:
            return int(fields["cls"].decode("utf-8").strip()), None
        if fields.get("json") is not None:
            meta = json.loads(fields["json"].decode("utf-8"))
            if isinstance(meta, int) and not isinstance(meta, bool):
                return meta, None
            if isinstance(meta, dict):
                for name in LABEL_JSON_FIELDS:
                    value = meta.get(name)
                    if isinstance(value, int) and not isinstance(value, bool):
                        return value, None
            return -1, None
    except (ValueError, UnicodeDecodeError) as e:
        return -1, f"bad class label for key {key!r}: {e}"
    return -1, None


def _to_sample(key: str, fields: dict[str, bytes | None], duplicate: bool) -> ShardSample:
    image_ext = next((ext for ext in IMAGE_EXTS if ext in fields), None)
    label, label_error = parse_label(fields, key)
    error = label_error
    if duplicate:
        error = f"duplicate key {key!r} in shard"
    elif image_ext is None:
        error = f"no image member ({'/'.join(IMAGE_EXTS)}); found {sorted(fields) or 'nothing'}"
    image = fields.get(image_ext) if image_ext else None
    return ShardSample(key=key, image=image, image_ext=image_ext, label=label, error=error)


def group_samples(members: Iterator[tuple[str, bytes | None]]) -> Iterator[ShardSample]:
    """Consecutive members with the same key form one sample (webdataset's rule); none is dropped."""
    seen: set[str] = set()
    key: str | None = None
    fields: dict[str, bytes | None] = {}
    for name, data in members:
        prefix, ext = base_plus_ext(name)
        if prefix is None:  # no extension: not part of any sample (webdataset ignores it too)
            continue
        ext = ext.lower()
        if prefix != key or ext in fields:
            if key is not None:
                yield _to_sample(key, fields, duplicate=key in seen)
                seen.add(key)
            key, fields = prefix, {}
        fields[ext] = data
    if key is not None:
        yield _to_sample(key, fields, duplicate=key in seen)


def iter_shard(url: str, read_data: bool = True) -> Iterator[ShardSample]:
    """Every sample of the shard at `url`, in order; ShardReadError if the tar is unreadable or cut short."""
    try:
        raw = open_url(url)
    except (OSError, ValueError) as e:
        raise ShardReadError(url, f"cannot open ({type(e).__name__}: {e})") from e
    with raw:
        yield from group_samples(iter_tar_members(raw, url, read_data=read_data))


def count_samples(url: str) -> int:
    """Number of samples (rows) in a shard, reading the whole archive so a truncated one is caught."""
    return sum(1 for _ in iter_shard(url, read_data=False))
