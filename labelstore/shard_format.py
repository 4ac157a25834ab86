"""The shard sample contract, the one place both the labeling job and the trainer take it from.

A WebDataset shard is a tar; consecutive members `<key>.<ext>` with the same key form one sample. The
image is the first of `IMAGE_EXTS` present, the class id comes from `cls` (a text int) or `json`
(`{"label"|"cls"|"class"|"class_id": n}` or a bare int), -1 when absent. Shard lists are brace patterns
(`data/train-{000000..000009}.tar`), expanded in order with duplicates removed.

Why not `webdataset.WebDataset` for the labeler: it drops samples it cannot decode and a tar truncated
at a header ends silently, so positions would shift. The label store's rows are
`first_row(shard) + position in shard`, so the labeler must see every sample, keep its place, and know
that the archive really ended (`iter_shard`, `count_samples`). The trainer streams with webdataset and
joins each sample to its row by key (labelstore/row_index.py), using the same field rules from here.

This module must not import webdataset: importing it loads torch, and labelstore stays torch-free. So
its small naming and URL rules are restated here (`base_plus_ext`, `expand_shard_urls`, `pipe:`), and
must keep agreeing with webdataset's, which the trainer's stream uses.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from typing import IO, Iterator, Mapping, Sequence

import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image field of a sample: the first of these present
LABEL_JSON_FIELDS = ("label", "cls", "class", "class_id")


class ShardReadError(OSError):
    """A shard that cannot be read completely (missing, unreadable or truncated tar): an I/O error the
    user fixes, so the CLIs print it as one line and exit 2."""

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


# --- field rules -----------------------------------------------------------------------------------

def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """Split a member name into (key, extensions) at the first dot of its basename; (None, None) without one.

    The same rule as `webdataset.tariterators.base_plus_ext` (restated because webdataset loads torch).
    """
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def image_field(fields: Mapping[str, object]) -> str | None:
    """The sample's image field: the first of IMAGE_EXTS it has, or None."""
    return next((ext for ext in IMAGE_EXTS if ext in fields), None)


def parse_label(fields: Mapping[str, object], key: str) -> tuple[int, str | None]:
    """(class id, error) from `cls` (text int) or `json` ({"label": int} or a bare int); -1 when absent."""
    try:
        if fields.get("cls") is not None:
            return int(bytes(fields["cls"]).decode("utf-8").strip()), None
        if fields.get("json") is not None:
            meta = json.loads(bytes(fields["json"]).decode("utf-8"))
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


def image_fingerprint(data: bytes) -> int:
    """A row's input fingerprint: blake2b-64 of the encoded image bytes as an unsigned int, never 0 (0 means
    "no fingerprint" in the store). Cheap next to decoding; a changed file under the same key shows up."""
    value = int.from_bytes(hashlib.blake2b(bytes(data), digest_size=8).digest(), "little")
    return value or 1


# --- shard lists -----------------------------------------------------------------------------------

def _expand_one(pattern: str) -> list[str]:
    # webdataset's `expand_urls`: '::' separates lists, ${name} reads the environment variable WDS_name,
    # then brace expansion.
    urls: list[str] = []
    for part in pattern.split("::"):
        for _ in range(10):
            last, part = part, re.sub(r"\$\{(\w+)\}", lambda m: os.environ.get(f"WDS_{m.group(1)}", m.group(0)), part)
            if part == last:
                break
        urls.extend(braceexpand.braceexpand(part))
    return urls


def expand_shard_urls(patterns: str | Sequence[str]) -> list[str]:
    """Brace patterns → URLs, in order, duplicates removed; ValueError naming the patterns if none results."""
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    for item in items:
        if glob.has_magic(str(item)) and "://" not in str(item) and not str(item).startswith("pipe:"):
            raise ValueError(f"shard list {str(item)!r} is a glob pattern; shard lists are brace patterns, e.g. "
                             "'data/train-{000000..000009}.tar' (or list the files)")
    urls = list(dict.fromkeys(u for item in items for u in _expand_one(str(item)) if u))
    if not urls:
        raise ValueError(f"shard list {patterns!r} names no shard")
    return urls


def absolute_url(url: str) -> str:
    """A local path made absolute (workers on another cwd or node open it as is); URLs unchanged."""
    return url if "://" in url or url.startswith("pipe:") else os.path.abspath(url)


# --- reading a tar, every member -------------------------------------------------------------------

class _PipeReader(io.RawIOBase):
    """stdout of a `pipe:<command>` URL; closing checks the exit status once the output was read to the end."""

    def __init__(self, url: str):
        self.url = url
        self._proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._proc.stdout.readinto(buffer)
        self._eof = self._eof or n == 0
        return n

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if not self._eof:
            self._proc.kill()  # the reader stopped early: the command's status means nothing
        self._proc.stdout.close()
        status = self._proc.wait()
        if self._eof and status != 0:
            raise ShardReadError(self.url, f"command exited with status {status}")


def open_url(url: str) -> IO[bytes]:
    """Open a shard for streaming: `pipe:<command>` reads the command's stdout, anything else fsspec
    (local paths, file://, s3://, http://, …)."""
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeReader(url))
    import fsspec  # only when a shard is opened

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


def _is_local_tar(url: str) -> bool:
    return ("://" not in url or url.startswith("file://")) and not url.startswith("pipe:") \
        and not url.endswith((".gz", ".tgz"))


def iter_tar_members(raw: IO[bytes], url: str, read_data: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) for every regular file member, in archive order; raises ShardReadError at a bad end.

    A plain local tar is read by seeking from header to header when the data is not wanted (counting a
    shard then costs its headers, not its size); anything else is streamed.
    """
    seekable = not read_data and _is_local_tar(url)
    stream: IO[bytes] = raw
    if url.endswith((".gz", ".tgz")):
        stream = gzip.GzipFile(fileobj=raw)  # a truncated gzip raises EOFError below
    counter = _ByteCounter(stream)
    try:
        with tarfile.open(fileobj=raw if seekable else counter, mode="r:" if seekable else "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                data = tar.extractfile(info).read() if read_data else None
                yield info.name, data
            end = tar.offset  # where the end-of-archive zero block must start
        if seekable:
            raw.seek(end)
            counter.pos = end
        while counter.read(1 << 20):
            pass
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise ShardReadError(url, f"unreadable or truncated tar ({type(e).__name__}: {e})") from e
    if counter.pos < end + tarfile.BLOCKSIZE or counter.last_nonzero >= end:
        raise ShardReadError(url, f"truncated or corrupt tar: no end-of-archive block after byte {end} "
                                  f"(file has {counter.pos} bytes)")


def _to_sample(key: str, fields: dict[str, bytes | None], duplicate: bool) -> ShardSample:
    image_ext = image_field(fields)
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


def shard_identity(url: str) -> tuple[int, str, str]:
    """(number of samples, first key, last key) of a shard; the whole archive is checked like `count_samples`."""
    n, first, last = 0, "", ""
    for sample in iter_shard(url, read_data=False):
        first, last, n = first or sample.key, sample.key, n + 1
    return n, first, last


def count_samples(url: str) -> int:
    """Number of samples (rows) in a shard; the whole archive is checked, so a truncated one raises
    ShardReadError. Both the labeling job (registering shards) and stage-1 training (sizing its
    schedule) count with this."""
    return sum(1 for _ in iter_shard(url, read_data=False))
