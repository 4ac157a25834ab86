"""The join: a streamed sample's row in the label store, found by its `__key__` (docs/design.md "The join").

A streaming reader (webdataset) has no position counter and skips bad samples, so a sample's row is
found by its key inside its shard's row range (from the store's shard table and `samples/key`), never
by counting. Each shard's keys are read once, in one slice, and kept by the store while it is used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import MissingRow, SchemaMismatch


@dataclass(frozen=True)
class ShardRows:
    """The stored rows of one shard: key → row, and the per-row `valid` / `label` columns."""

    shard_index: int
    url: str
    first_row: int
    num_samples: int
    keys: dict  # str → absolute row
    valid: np.ndarray  # (num_samples,) bool, indexed by row − first_row
    labels: np.ndarray  # (num_samples,) int32 (−1: unknown)

    @classmethod
    def from_columns(cls, shard_index: int, url: str, first_row: int, columns: dict) -> "ShardRows":
        """From `LabelStore.read_samples` of the shard's sample rows (empty keys: rows not written yet)."""
        return cls(shard_index=shard_index, url=url, first_row=first_row, num_samples=len(columns["key"]),
                   keys={str(k): first_row + j for j, k in enumerate(columns["key"]) if str(k) != ""},
                   valid=np.asarray(columns["valid"], dtype=bool), labels=np.asarray(columns["label"]))

    def row(self, key: str) -> int:
        try:
            return self.keys[key]
        except KeyError:
            raise MissingRow(f"sample key {key!r} of shard {self.url!r} (store shard {self.shard_index}) has no "
                             f"row in the label store: the shards differ from those that were labelled") from None

    def rows(self, keys) -> np.ndarray:
        """Rows of `keys`, -1 where a key is absent."""
        return np.array([self.keys.get(str(k), -1) for k in keys], np.int64)

    def is_valid(self, row: int) -> bool:
        return bool(self.valid[row - self.first_row])

    def label(self, row: int) -> int:
        return int(self.labels[row - self.first_row])

    @property
    def stop(self) -> int:
        """One past the shard's last sample row (padding rows after it are not samples)."""
        return self.first_row + self.num_samples


def match_urls(urls: Sequence[str], store_urls: Sequence[str]) -> dict[str, int]:
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
    """Row lookup for a list of shard URLs against one store (picklable; each shard's rows read lazily)."""

    def __init__(self, store, urls: Sequence[str]):
        self.store = store
        self.shard_of_url = match_urls(list(urls), [s.url for s in store.shards])

    def shard_rows(self, url: str) -> ShardRows:
        """The rows of `url`'s shard (read once while it streams; see `LabelStore.shard_rows`)."""
        if url not in self.shard_of_url:
            self.shard_of_url.update(match_urls([url], [s.url for s in self.store.shards]))
        return self.store.shard_rows(self.shard_of_url[url])
