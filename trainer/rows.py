"""Find a streamed sample's row in the label store by its `__key__` (docs/design.md "The join").

webdataset has no position counter and skips bad samples, so a sample's row is found by its key
inside its shard's row range (from the store's shard table and `samples/key`), never by counting.
Each shard's keys are read once, in one slice, when the first sample of that shard arrives.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from labelstore import SchemaMismatch


class MissingRow(SchemaMismatch):
    """A streamed sample's key is not among the labelled rows of its shard."""


@dataclass(frozen=True)
class ShardRows:
    """The labelled rows of one shard: key → row, and the per-row `valid` / `label` columns."""

    shard_index: int
    url: str
    first_row: int
    num_samples: int
    keys: dict  # str → absolute row
    valid: np.ndarray  # (num_samples,) bool, indexed by row − first_row
    labels: np.ndarray  # (num_samples,) int32 (−1: unknown)

    def row(self, key: str) -> int:
        try:
            return self.keys[key]
        except KeyError:
            raise MissingRow(f"sample key {key!r} of shard {self.url!r} (store shard {self.shard_index}) has no "
                             f"row in the label store: the shards differ from those that were labelled") from None

    def is_valid(self, row: int) -> bool:
        return bool(self.valid[row - self.first_row])

    def label(self, row: int) -> int:
        return int(self.labels[row - self.first_row])

    @property
    def stop(self) -> int:
        """One past the shard's last sample row (padding rows after it are not samples)."""
        return self.first_row + self.num_samples


def match_urls(urls, store_urls) -> dict[str, int]:
    """Map each given shard URL to its index in the store's shard table.

    An exact match wins; otherwise the file name, when file names in the store are unique (shards
    are often copied or mounted elsewhere after labelling). Anything unmatched is a SchemaMismatch
    naming the shard: those labels were made from another shard list.
    """
    exact = {u: i for i, u in enumerate(store_urls)}
    names: dict[str, list[int]] = {}
    for i, u in enumerate(store_urls):
        names.setdefault(os.path.basename(u), []).append(i)
    out, missing = {}, []
    for u in urls:
        if u in exact:
            out[u] = exact[u]
        elif len(names.get(os.path.basename(u), [])) == 1:
            out[u] = names[os.path.basename(u)][0]
        else:
            missing.append(u)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        have = ", ".join(repr(s) for s in list(store_urls)[:3]) + (" ..." if len(store_urls) > 3 else "")
        raise SchemaMismatch(f"shard(s) {shown} are not in the label store's shard table ({len(store_urls)} "
                             f"shards: {have}): the labels were made from another shard list")
    return out


class RowIndex:
    """Row lookup for a list of shard URLs against one store (picklable; keys loaded lazily per shard)."""

    _CACHED = 2  # a worker streams one shard at a time (and finishes the previous one)

    def __init__(self, store, urls):
        self.store = store
        shards = list(store.shards)
        self._shards = {s.index: (s.url, int(s.first_row), int(s.num_samples)) for s in shards}
        self.shard_of_url = match_urls(list(urls), [s.url for s in shards])
        self._cache: dict[int, ShardRows] = {}

    def shard_rows(self, url: str) -> ShardRows:
        """The rows of `url`'s shard: one read of its key/valid/label slices, kept while it streams."""
        if url not in self.shard_of_url:
            self.shard_of_url.update(match_urls([url], [u for u, _, _ in self._shards.values()]))
        idx = self.shard_of_url[url]
        if idx in self._cache:
            return self._cache[idx]
        _, first, n = self._shards[idx]
        cols = self.store.read_samples(slice(first, first + n))
        rows = ShardRows(
            shard_index=idx, url=url, first_row=first, num_samples=n,
            keys={str(k): first + j for j, k in enumerate(cols["key"]) if str(k) != ""},
            valid=np.asarray(cols["valid"], dtype=bool), labels=np.asarray(cols["label"]),
        )
        if len(self._cache) >= self._CACHED:
            self._cache.pop(next(iter(self._cache)))
        self._cache[idx] = rows
        return rows
