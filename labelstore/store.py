"""`LabelStore`: one Zarr v3 store, a shared `samples/` index and any number of `labelers/<name>/`.

Handles are lazy and picklable (only the path and mode travel), so DataLoader workers and Ray actors
each open their own. Opened read-only by default. Creation, shard registration and labeler creation
rewrite group metadata: they run under the store lock (labelstore/store_lock.py), so several drivers
may start on one store at once; shard writes may run in parallel, one writer per shard.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import warnings
from importlib.metadata import version
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import SchemaMismatch, ShardConflict, StoreCorrupt, StoreError
from .labeler_store import LabelerStore
from .row_index import RowIndex, ShardRows, match_shard_names
from .schema import (DEFAULT_ROWS_PER_CHUNK, DONE, ERRORS, FINGERPRINT, FORMAT, LABEL_FILL, READABLE_SCHEMA_VERSIONS,
                     SCHEMA_VERSION, LabelerSpec, ShardInfo, inner_chunk_rows, labeler_arrays, spec_diff)
from .store_lock import store_lock

DATA_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
# Blosc checks no data; a crc32c per chunk turns a damaged chunk into an error instead of wrong numbers.
DATA_CODECS = (DATA_COMPRESSOR, Crc32cCodec())
_CACHED_SHARD_ROWS = 16  # a streaming reader needs one shard at a time (two while it moves on)


def _tool_version() -> str:
    try:
        return version("stl-token-labels")
    except Exception:  # not installed (e.g. run from a source tree): the version is informational only
        return "unknown"


@dataclass(frozen=True)
class SampleArrays:
    """The shared per-row sample index (zarr arrays): key (str), label (int32, -1 unknown), image_hw, valid,
    fingerprint (uint64 image_fingerprint, 0 = none; None in a schema 1 store)."""

    key: Any
    label: Any
    image_hw: Any
    valid: Any
    fingerprint: Any = None

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


class LabelStore:
    """A label store on disk (any path or URL zarr understands). Use `create` or `open`."""

    def __init__(self, path: str, mode: str = "r") -> None:
        if mode not in ("r", "r+"):
            raise StoreError(f"LabelStore mode must be 'r' or 'r+', got {mode!r}")
        self.path, self.mode = str(path), mode
        self._root: zarr.Group | None = None
        self._shards: list[ShardInfo] | None = None
        self._key_cache: dict[int, ShardRows] = {}
        self._samples: SampleArrays | None = None
        self._generation = 0  # bumped whenever array shapes change, so cached handles are dropped

    # -- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, *, seed: int, rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
               exist_ok: bool = False) -> "LabelStore":
        """Create an empty store; with exist_ok, open an existing one after checking seed and rows_per_chunk."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise StoreError(f"store seed must be an int >= 0, got {seed!r}")
        if isinstance(rows_per_chunk, bool) or not isinstance(rows_per_chunk, (int, np.integer)) or rows_per_chunk < 1:
            raise StoreError(f"rows_per_chunk must be an int >= 1, got {rows_per_chunk!r}")
        with store_lock(str(path), create_dir=True):  # a second driver starting now waits, then opens it
            return cls._create_locked(str(path), int(seed), int(rows_per_chunk), exist_ok)

    @classmethod
    def _create_locked(cls, path: str, seed: int, rows_per_chunk: int, exist_ok: bool) -> "LabelStore":
        try:
            root = zarr.create_group(str(path), overwrite=False)  # "w-" would refuse the directory holding the lock
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as e:
            if not exist_ok:
                raise StoreError(f"{path}: a store already exists (open it, or pass exist_ok=True)") from e
            store = cls.open(path, mode="r+")
            diff = spec_diff({"seed": store.seed, "rows_per_chunk": store.rows_per_chunk},
                             {"seed": int(seed), "rows_per_chunk": int(rows_per_chunk)})
            if diff:
                raise SchemaMismatch(f"{path}: existing store differs:\n" + "\n".join(diff))
            return store
        # attrs last (below): a half-created store fails `open` with "not a label store", never a KeyError
        samples = root.create_group("samples")
        samples.attrs["shards"] = []
        rpc = int(rows_per_chunk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr flags variable-length strings as not yet in the v3 spec
            samples.create_array("key", shape=(0,), chunks=(rpc,), dtype=str)
        samples.create_array("label", shape=(0,), chunks=(rpc,), dtype="int32", fill_value=LABEL_FILL)
        samples.create_array("image_hw", shape=(0, 2), chunks=(rpc, 2), dtype="int32", fill_value=0)
        samples.create_array("valid", shape=(0,), chunks=(rpc,), dtype="bool", fill_value=False)
        samples.create_array(FINGERPRINT, shape=(0,), chunks=(rpc,), dtype="uint64", fill_value=0)
        root.create_group("labelers")
        root.attrs.update({"format": FORMAT, "schema_version": SCHEMA_VERSION, "seed": int(seed),
                           "rows_per_chunk": int(rows_per_chunk), "tool_version": _tool_version(),
                           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        return cls(str(path), "r+")

    @classmethod
    def open(cls, path: str, mode: str = "r") -> "LabelStore":
        """Open lazily; the format and schema version are checked at once."""
        store = cls(str(path), mode)
        store._group()
        return store

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["mode"])

    def __repr__(self) -> str:
        return f"LabelStore({self.path!r}, mode={self.mode!r})"

    def _group(self) -> zarr.Group:
        if self._root is None:
            try:
                root = zarr.open_group(self.path, mode=self.mode)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
                raise StoreError(f"{self.path}: no label store here") from e
            attrs = dict(root.attrs)
            if attrs.get("format") != FORMAT:
                raise StoreError(f"{self.path}: not a label store (attrs format={attrs.get('format')!r}, expected {FORMAT!r})")
            if attrs.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
                raise SchemaMismatch(f"{self.path}: schema_version {attrs.get('schema_version')!r} is not one this "
                                     f"code reads ({', '.join(map(str, READABLE_SCHEMA_VERSIONS))})")
            if self.mode == "r+" and attrs.get("schema_version") != SCHEMA_VERSION:
                raise SchemaMismatch(f"{self.path}: schema_version {attrs.get('schema_version')} store (no image "
                                     f"fingerprints, missing chunks undetectable) can be read but not written by this "
                                     f"code (schema {SCHEMA_VERSION}): label into a new store")
            self._root = root
        return self._root

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise StoreError(f"{self.path}: opened read-only; open with mode='r+' to write")

    def refresh(self) -> None:
        """Forget cached metadata (shards, key index) so the next access re-reads it."""
        self._root, self._shards, self._key_cache, self._samples = None, None, {}, None
        self._generation += 1

    # -- store-level facts -------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group().attrs)

    @property
    def schema_version(self) -> int:
        return int(self._group().attrs["schema_version"])

    @property
    def has_fingerprints(self) -> bool:
        """False for a schema 1 store: its rows carry no image fingerprints, so inputs are not checked."""
        return self.samples.fingerprint is not None

    @property
    def seed(self) -> int:
        return int(self._group().attrs["seed"])

    @property
    def rows_per_chunk(self) -> int:
        return int(self._group().attrs["rows_per_chunk"])

    @property
    def shards(self) -> list[ShardInfo]:
        if self._shards is None:
            rpc = self.rows_per_chunk
            raw = self._group()["samples"].attrs.get("shards", [])
            self._shards = [ShardInfo.from_dict(i, s, rpc) for i, s in enumerate(raw)]
        return self._shards

    def shard(self, index: int) -> ShardInfo:
        shards = self.shards
        if not 0 <= int(index) < len(shards):
            raise StoreError(f"{self.path}: shard index {index} out of range (store has {len(shards)} shards)")
        return shards[int(index)]

    @property
    def num_rows(self) -> int:
        return self.shards[-1].end if self.shards else 0

    @property
    def samples(self) -> SampleArrays:
        if self._samples is None:
            g = self._group()["samples"]
            fingerprint = g[FINGERPRINT] if FINGERPRINT in g.array_keys() else None
            self._samples = SampleArrays(*(g[name] for name in ("key", "label", "image_hw", "valid")), fingerprint)
        return self._samples

    def read_samples(self, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """key, label, image_hw, valid and fingerprint (zeros in a schema 1 store) for a row slice or an int
        array of rows. A damaged chunk raises StoreError naming the array and rows."""
        s = self.samples
        names = ("key", "label", "image_hw", "valid") + ((FINGERPRINT,) if s.fingerprint is not None else ())
        where = f"rows {rows.start}..{rows.stop}" if isinstance(rows, slice) else f"{len(rows)} rows"
        try:
            if isinstance(rows, slice):
                out = {n: np.asarray(s[n][rows]) for n in names}
            else:
                rows = np.asarray(rows, np.int64)
                out = {n: np.asarray(s[n].oindex[rows] if n != "image_hw" else s[n].oindex[rows, :]) for n in names}
        except (ValueError, RuntimeError) as e:  # crc32c mismatch, truncated zstd: name what is damaged
            raise StoreCorrupt(f"{self.path}: samples/ {where}: damaged chunk ({type(e).__name__}: {e})") from None
        if s.fingerprint is None:
            out[FINGERPRINT] = np.zeros(len(out["key"]), np.uint64)
        return out

    def shard_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Shard index of each row (-1 for padding rows beyond a shard's samples)."""
        rows = np.asarray(rows, np.int64)
        firsts = np.array([s.first_row for s in self.shards], np.int64)
        stops = np.array([s.stop for s in self.shards], np.int64)
        if not len(firsts):
            return np.full(rows.shape, -1, np.int64)
        idx = np.searchsorted(firsts, rows, side="right") - 1
        ok = (idx >= 0) & (rows < stops[np.clip(idx, 0, None)])
        return np.where(ok, idx, -1)

    # -- shards ------------------------------------------------------------------------------------
    def register_shards(self, items: Iterable[tuple], root: str | None = None) -> list[ShardInfo]:
        """Register input shards in order; each starts on a write-unit boundary.

        `items` are (url, num_samples) or (url, num_samples, first_key, last_key). A shard's identity is its
        name: its path relative to `root` (the dataset root; None = the file name). Idempotent per name, so
        the same shards at another path or URL are the same shards. Atomic under the store lock.
        """
        self._require_writable()
        with store_lock(self.path):
            self.refresh()
            return self._register_locked(list(items), root)

    def _register_locked(self, items: list[tuple], root: str | None) -> list[ShardInfo]:
        known = {s.identity: s for s in self.shards}
        raw = [s.to_dict() for s in self.shards]
        out, end, rpc = [], self.num_rows, self.rows_per_chunk
        for item in items:
            url, num_samples = item[0], item[1]
            first_key, last_key = (str(item[2]), str(item[3])) if len(item) >= 4 else ("", "")
            if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
                raise StoreError(f"shard {url!r}: num_samples must be an int >= 1, got {num_samples!r}")
            name = shard_name(str(url), root)
            have = known.get(name)
            if have is not None:
                if have.num_samples != num_samples or (first_key and have.first_key and
                                                      (have.first_key, have.last_key) != (first_key, last_key)):
                    raise ShardConflict(
                        f"{self.path}: shard {name!r} ({url}) is registered with {have.num_samples} samples, keys "
                        f"{have.first_key!r}..{have.last_key!r}; this file has {num_samples} samples, keys "
                        f"{first_key!r}..{last_key!r}: another file under the same name")
                out.append(have)
                continue
            info = ShardInfo(len(raw), str(url), end, int(num_samples), rpc, name, first_key, last_key)
            raw.append(info.to_dict())
            known[name], end = info, info.end
            out.append(info)
        if len(raw) != len(self.shards):
            self._grow(end, len(raw))
            self._samples, self._generation = None, self._generation + 1
            self._group()["samples"].attrs["shards"] = raw  # after the arrays grew: readers never see rows missing
            self._shards = None
        return out

    def match_shards(self, urls: Iterable[str], missing_ok: bool = False, by_file_name: bool = True) -> list[ShardInfo]:
        """The registered shard of each url, matched by name (the same shards at any path or URL; with
        `by_file_name`, a unique file name also matches); SchemaMismatch naming the shards that are not in
        the store (with `missing_ok`: None for those) or that match ambiguously."""
        urls = list(urls)
        index = match_shard_names(urls, [s.identity for s in self.shards], [s.url for s in self.shards], missing_ok,
                                  by_file_name)
        return [self.shards[index[u]] if u in index else None for u in urls]

    def _grow(self, num_rows: int, num_shards: int) -> None:
        g = self._group()
        for name in ("key", "label", "valid", FINGERPRINT):
            if name in g["samples"].array_keys():
                g["samples"][name].resize((num_rows,))
        g["samples"]["image_hw"].resize((num_rows, 2))
        for name in self.labelers():
            lg = g["labelers"][name]
            for path, arr in _walk_arrays(lg):
                if path == DONE:
                    arr.resize((num_shards,))
                else:
                    arr.resize((num_rows,) + arr.shape[1:])

    # -- samples join ------------------------------------------------------------------------------
    def shard_rows(self, shard_index: int) -> ShardRows:
        """A shard's stored rows: key → row (the join by webdataset `__key__` inside the shard's row range),
        valid and label. Read in one slice and kept for the last few shards asked for."""
        rows = self._key_cache.get(int(shard_index))
        if rows is None:
            info = self.shard(shard_index)
            rows = ShardRows.from_columns(info.index, info.url, info.first_row,
                                          self.read_samples(slice(info.first_row, info.stop)))
            if len(self._key_cache) >= _CACHED_SHARD_ROWS:
                self._key_cache.pop(next(iter(self._key_cache)))
            self._key_cache[int(shard_index)] = rows
        return rows

    def find_rows(self, shard_index: int, keys: Iterable[str]) -> np.ndarray:
        """Rows of `keys` inside a shard's row range (join by webdataset `__key__`); -1 where absent."""
        return self.shard_rows(shard_index).rows(keys)

    def row_index(self, urls: Iterable[str]) -> RowIndex:
        """Row lookup by shard URL (exact, or by unique file name) for a reader streaming `urls`."""
        return RowIndex(self, list(urls))

    # -- labelers ----------------------------------------------------------------------------------
    def labelers(self) -> list[str]:
        return sorted(self._group()["labelers"].group_keys())

    def labeler(self, name: str, expect: "LabelerSpec | Mapping[str, Any] | None" = None) -> "LabelerStore":
        """Open labeler `name`; with `expect` (a spec, or a mapping of the fields to check) fail on any difference.

        The one compatibility check: the job re-opening its labeler and a trainer reading it both call this.
        """
        names = self.labelers()
        if name not in names:
            raise SchemaMismatch(f"label store {self.path} has no labeler {name!r} "
                                 f"(it has: {', '.join(map(repr, names)) or 'none'})")
        lab = LabelerStore(self, name)
        if expect is not None:
            want = expect.to_dict() if isinstance(expect, LabelerSpec) else dict(expect)
            if isinstance(expect, LabelerSpec) and expect.seed is None:
                want.pop("seed")
            unknown = set(want) - set(lab.spec.to_dict())
            if unknown:
                raise StoreError(f"labeler {name!r}: unknown fields in expect: {sorted(unknown)}")
            diff = spec_diff(lab.spec.to_dict(), want)
            if diff:
                raise SchemaMismatch(f"{self.path}: labeler {name!r} differs from what is expected:\n" + "\n".join(diff))
        return lab

    def add_labeler(self, spec: LabelerSpec) -> "LabelerStore":
        """Create labelers/<spec.name>/ (or open it after checking it matches `spec`); under the store lock."""
        self._require_writable()
        if spec.seed is None:
            spec = dataclasses.replace(spec, seed=self.seed)
        with store_lock(self.path):
            self.refresh()
            if spec.name in self.labelers():
                return self.labeler(spec.name, expect=spec)
            return self._add_labeler_locked(spec)

    def _add_labeler_locked(self, spec: LabelerSpec) -> "LabelerStore":
        rpc, rows, num_shards = self.rows_per_chunk, self.num_rows, len(self.shards)
        g = self._group()["labelers"].create_group(spec.name)
        for path, (tail, dtype, fill) in labeler_arrays(spec).items():
            view_bytes = int(np.prod(tail)) * dtype.itemsize
            inner = inner_chunk_rows(rpc, view_bytes)
            g.create_array(path, shape=(rows, spec.views) + tail, dtype=dtype, fill_value=fill,
                           chunks=(inner, 1) + tail, shards=(rpc, spec.views) + tail, compressors=DATA_CODECS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g.create_array(ERRORS, shape=(rows,), chunks=(rpc,), dtype=str)
        g.create_array(DONE, shape=(num_shards,), chunks=(1,), dtype="uint8", fill_value=0)
        g.attrs.update(spec.to_dict())  # attrs last: a labeler without attrs is treated as corrupt
        return self.labeler(spec.name)

    def labeler_spec(self, name: str) -> LabelerSpec:
        attrs = dict(self._group()["labelers"][name].attrs)
        if not attrs:
            raise StoreCorrupt(f"{self.path}: labelers/{name} has no spec attrs (creation was interrupted)")
        return LabelerSpec.from_dict(attrs)


def shard_name(url: str, root: str | None) -> str:
    """A shard's identity: its path relative to the dataset root (forward slashes), or its file name."""
    path = url.split("://", 1)[-1] if "://" in url else url
    if root:
        root_path = root.split("://", 1)[-1] if "://" in root else root
        rel = os.path.relpath(path, root_path) if not path.startswith("pipe:") else path
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return os.path.basename(path.rstrip("/"))


def _walk_arrays(group: zarr.Group, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, arr in group.arrays():
        out.append((prefix + name, arr))
    for name, sub in group.groups():
        out += _walk_arrays(sub, prefix + name + "/")
    return out
