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
    fingerprints: np.ndarray | None = None  # (num_samples,) uint64 image_fingerprint, 0 = not recorded
    image_hw: np.ndarray | None = None  # (num_samples, 2) int32

    @classmethod
    def from_columns(cls, shard_index: int, url: str, first_row: int, columns: dict) -> "ShardRows":
        """From `LabelStore.read_samples` of the shard's sample rows (empty keys: rows not written yet)."""
        return cls(shard_index=shard_index, url=url, first_row=first_row, num_samples=len(columns["key"]),
                   keys={str(k): first_row + j for j, k in enumerate(columns["key"]) if str(k) != ""},
                   valid=np.asarray(columns["valid"], dtype=bool), labels=np.asarray(columns["label"]),
                   fingerprints=np.asarray(columns["fingerprint"], np.uint64) if "fingerprint" in columns else None,
                   image_hw=np.asarray(columns["image_hw"]) if "image_hw" in columns else None)

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

    def fingerprint(self, row: int) -> int:
        """The stored `shard_format.image_fingerprint` of the row's image; 0 = none recorded (not checked)."""
        return 0 if self.fingerprints is None else int(self.fingerprints[row - self.first_row])

    def hw(self, row: int) -> tuple[int, int]:
        """The stored (height, width) of the row's decoded image ((0, 0) for an invalid row)."""
        if self.image_hw is None:
            return (0, 0)
        h, w = self.image_hw[row - self.first_row]
        return int(h), int(w)

    @property
    def stop(self) -> int:
        """One past the shard's last sample row (padding rows after it are not samples)."""
        return self.first_row + self.num_samples


def _parts(url: str) -> list[str]:
    path = url.split("://", 1)[-1] if "://" in url else url
    return [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]


def match_shard_names(urls: Sequence[str], names: Sequence[str], store_urls: Sequence[str] = (),
                      missing_ok: bool = False, by_file_name: bool = True) -> dict[str, int]:
    """Map each given shard URL to its index in the store's shard table, by shard name.

    A stored shard is known by its name (its path relative to the dataset root when it was registered,
    e.g. "train/shard-000001.tar"); a URL matches it when the URL's path ends with that name, whatever
    comes before (the same shards copied, mounted elsewhere, or given as relative paths). The stored
    URL itself matches too. The longest matching name wins; failing that (with `by_file_name`), the file
    name alone; a tie is ambiguous. Anything unmatched is a
    SchemaMismatch naming the shard (with `missing_ok`, left out of the result): those labels were made
    from another shard list.
    """
    exact = {u: i for i, u in enumerate(store_urls)}
    by_last: dict[str, list[tuple[list[str], int]]] = {}
    for i, n in enumerate(names):
        parts = _parts(n)
        if parts:
            by_last.setdefault(parts[-1], []).append((parts, i))
    out, missing, ambiguous = {}, [], []
    for u in urls:
        if u in exact:
            out[u] = exact[u]
            continue
        parts = _parts(u)
        same_file = by_last.get(parts[-1] if parts else "", [])
        cands = [(len(p), i) for p, i in same_file if parts[-len(p):] == p]
        if not cands and by_file_name:  # the directories differ too (e.g. flattened): the file name alone, if unique
            cands = [(1, i) for _, i in same_file]
        if not cands:
            missing.append(u)
            continue
        best = max(c[0] for c in cands)
        top = [i for n, i in cands if n == best]
        if len(top) > 1:
            ambiguous.append(f"{u!r} (matches {', '.join(repr(names[i]) for i in top[:3])})")
        else:
            out[u] = top[0]
    if ambiguous:
        raise SchemaMismatch(f"shard(s) {', '.join(ambiguous[:3])} match several shards of the label store by name: "
                             "give paths that keep the directories the shards were labelled with")
    if missing and not missing_ok:
        shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        have = ", ".join(repr(s) for s in list(names)[:3]) + (" ..." if len(names) > 3 else "")
        raise SchemaMismatch(f"shard(s) {shown} are not in the label store's shard table ({len(names)} "
                             f"shards: {have}): the labels were made from another shard list")
    return out


def match_urls(urls: Sequence[str], store_urls: Sequence[str]) -> dict[str, int]:
    """`match_shard_names` for stores whose shards are known by URL only (a shard's name is its file name)."""
    return match_shard_names(urls, [os.path.basename(u) for u in store_urls], store_urls)


class RowIndex:
    """Row lookup for a list of shard URLs against one store (picklable; each shard's rows read lazily)."""

    def __init__(self, store, urls: Sequence[str]):
        self.store = store
        self.shard_of_url = {u: s.index for u, s in zip(urls, store.match_shards(list(urls)))}

    def shard_rows(self, url: str) -> ShardRows:
        """The rows of `url`'s shard (read once while it streams; see `LabelStore.shard_rows`)."""
        if url not in self.shard_of_url:
            self.shard_of_url[url] = self.store.match_shards([url])[0].index
        return self.store.shard_rows(self.shard_of_url[url])
