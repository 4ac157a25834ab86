"""`LabelerStore`: one labeler's arrays in a store — validated whole-shard writes, `done` last, reads.

A shard write validates everything before touching disk, clears `done` if the shard is being
rewritten, writes the shared sample rows and the labeler's arrays as whole write units (so no Zarr
shard file is ever read-modified-written or shared by two writers), and sets `done[shard]` last. A
writer killed midway leaves `done = 0`: the shard is reported missing and is simply written again.
"""
from __future__ import annotations

import asyncio
from typing import Any, Iterable, Mapping

import numpy as np
from zarr.core.sync import sync

from .codec import EncodedLogits
from .errors import InvalidLabels, ShardCapacityError, ShardConflict, StoreCorrupt, StoreError
from .schema import (CLS_DENSE, CLS_TOPK, DONE, ERRORS, FINGERPRINT, PARAMS, TOKENS_DENSE, TOKENS_TOPK, LabelerSpec,
                     ShardInfo, labeler_arrays)
from .views import NUM_PARAMS


class LabelerStore:
    """Handle on labelers/<name>/ of a LabelStore (picklable: it carries the store's path and mode)."""

    def __init__(self, store: Any, name: str) -> None:
        self.store, self.name = store, name
        self.spec: LabelerSpec = store.labeler_spec(name)
        self._done_cache: np.ndarray | None = None
        self._arrays: dict[str, Any] = {}
        self._generation = store._generation

    def __repr__(self) -> str:
        return f"LabelerStore({self.store.path!r}, {self.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], state["name"])

    def array(self, path: str) -> Any:
        """The zarr array at labelers/<name>/<path> (e.g. "tokens/topk_logit")."""
        if self._generation != self.store._generation:  # shards were registered: shapes changed
            self._arrays, self._generation = {}, self.store._generation
        if path not in self._arrays:  # each lookup re-reads metadata, so handles are kept
            self._arrays[path] = self.store._group()["labelers"][self.name][path]
        return self._arrays[path]

    @property
    def array_paths(self) -> list[str]:
        return list(labeler_arrays(self.spec)) + [ERRORS, DONE]

    # -- done mask ---------------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        """(num_shards,) bool. Read once per handle when read-only (a reader sees a fixed snapshot)."""
        if self._done_cache is None or self.store.mode == "r+":
            done = np.asarray(self.array(DONE)[:]).astype(bool)
            n = len(self.store.shards)
            if done.shape[0] < n:  # shards registered after this labeler was created and not yet resized
                done = np.concatenate([done, np.zeros(n - done.shape[0], bool)])
            self._done_cache = done[:n]
        return self._done_cache

    def missing_shards(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    # -- writing -----------------------------------------------------------------------------------
    def write_shard(self, shard_index: int, *, keys: Iterable[str], labels: Any, image_hw: Any, valid: Any,
                    params: Any, tokens: EncodedLogits, cls: EncodedLogits,
                    errors: Iterable[Mapping[str, str]] = (), fingerprints: Any = None) -> None:
        """Write one whole shard: n = len(keys) <= the registered num_samples; `done` is set last.

        `fingerprints` (n,) uint64: `shard_format.image_fingerprint` of each row's encoded image (0 = none).
        A class label outside [-1, num_classes) makes only its row invalid, with a reason naming the key.
        """
        self.store._require_writable()
        info = self.store.shard(shard_index)
        keys = list(keys)
        valid, errors = self._compare_inputs(info, keys, fingerprints, valid, list(errors))
        batch = _validate(self.spec, info, list(keys), labels, image_hw, valid, params, tokens, cls, list(errors),
                          fingerprints)
        self._check_conflict(info, batch["key"], int(shard_index))

        done = self.array(DONE)
        if int(done[int(shard_index)]):
            done[int(shard_index)] = 0  # rewriting a done shard: invisible until complete again
        rows = slice(info.first_row, info.end)
        samples = self.store.samples
        writes = [(samples[n], batch[n]) for n in ("key", "label", "image_hw", "valid")]
        if samples.fingerprint is not None:
            writes.append((samples.fingerprint, batch[FINGERPRINT]))
        writes += [(self.array(p), data) for p, data in batch["arrays"].items()]
        writes.append((self.array(ERRORS), batch["errors"]))

        async def write_all() -> None:  # all at once: zarr calls are latency-bound, not bandwidth-bound
            await asyncio.gather(*(arr.async_array.setitem(rows, data) for arr, data in writes))
        sync(write_all())
        done[int(shard_index)] = 1  # last, after every write above completed: now readers see the shard
        self.store._key_cache.pop(int(shard_index), None)

    def _compare_inputs(self, info: ShardInfo, keys: list, fingerprints: Any, valid: Any,
                        errors: list) -> tuple[Any, list]:
        """Against the fingerprints already stored for this shard (another labeler, or an earlier run): when
        most images differ the shards changed since labelling (ShardConflict); a few changed images become
        invalid rows with a reason (the other labels in the store were made from the old images)."""
        if fingerprints is None or self.store.samples.fingerprint is None:
            return valid, errors
        new = np.asarray(fingerprints, np.uint64)
        if new.shape != (len(keys),):
            return valid, errors  # _validate reports the shape
        old = np.asarray(self.store.samples.fingerprint[info.first_row:info.first_row + len(keys)], np.uint64)
        both = (old != 0) & (new != 0)
        changed = both & (old != new)
        if not changed.any():
            return valid, errors
        if 2 * int(changed.sum()) > int(both.sum()):
            raise ShardConflict(
                f"{self.store.path}: shard {info.index} ({info.identity}): {int(changed.sum())} of {int(both.sum())} "
                f"images differ from those labelled before (fingerprints), e.g. key {keys[int(np.flatnonzero(changed)[0])]!r}: "
                "the shards changed since labelling; label them into a new store")
        valid = np.asarray(valid, bool) & ~changed
        have = {e.get("key") for e in errors if isinstance(e, Mapping)}
        errors = errors + [{"key": keys[i], "reason": f"image of key {keys[i]!r} changed since this shard was first "
                                                      "labelled (fingerprint differs)"}
                           for i in np.flatnonzero(changed) if keys[i] not in have]
        return valid, errors

    def _check_conflict(self, info: ShardInfo, keys: np.ndarray, shard_index: int) -> None:
        stored = np.asarray(self.store.samples.key[info.first_row:info.end])
        if np.all(stored == ""):
            return  # nobody wrote this shard's sample rows yet
        if not np.array_equal(stored, keys):
            n_old = int(np.count_nonzero(stored != ""))
            first_bad = int(np.flatnonzero(stored != keys)[0])
            raise ShardConflict(
                f"{self.store.path}: shard {shard_index} ({info.url}) already holds {n_old} sample keys that differ "
                f"from this write ({int(np.count_nonzero(keys != ''))} keys); first difference at row "
                f"{info.first_row + first_bad}: stored {stored[first_bad]!r}, new {keys[first_bad]!r}")

    # -- reading -----------------------------------------------------------------------------------
    def read(self, rows: slice | Any, view: int | Any) -> dict[str, Any]:
        """params (n, P), tokens EncodedLogits (n, T, ·), cls EncodedLogits (n, ·) for rows × view.

        `rows` is a slice or an int array; `view` an int or an int array with one view per row.
        Every row must belong to a done shard (padding rows and unfinished shards raise StoreError).
        """
        row_idx = np.arange(*rows.indices(self.store.num_rows)) if isinstance(rows, slice) else np.asarray(rows, np.int64)
        if row_idx.ndim != 1:
            raise StoreError(f"labeler {self.name!r}: rows must be a slice or a 1-D int array")
        self._check_rows_done(row_idx)
        if np.ndim(view) == 0:
            v = int(view)
            if not 0 <= v < self.spec.views:
                raise StoreError(f"labeler {self.name!r}: view {v} out of range (S = {self.spec.views})")
            contiguous = isinstance(rows, slice) and (rows.step in (None, 1))
            if contiguous and len(row_idx):
                data = self._gather_reads((slice(int(row_idx[0]), int(row_idx[-1]) + 1), v), basic=True)
            else:
                data = self._gather_reads((row_idx, v), basic=False)
        else:
            views = np.asarray(view, np.int64)
            if views.shape != row_idx.shape:
                raise StoreError(f"labeler {self.name!r}: view array shape {views.shape} != rows shape {row_idx.shape}")
            if views.size and (views.min() < 0 or views.max() >= self.spec.views):
                raise StoreError(f"labeler {self.name!r}: view ids must be in [0, {self.spec.views})")
            data = {p: np.empty((len(row_idx),) + tail, dtype)
                    for p, (tail, dtype, _) in labeler_arrays(self.spec).items()}
            for v in np.unique(views):
                at = np.flatnonzero(views == v)
                for p, part in self._gather_reads((row_idx[at], int(v)), basic=False).items():
                    data[p][at] = part
        self._check_complete(row_idx, data)
        return _assemble(self.spec, data)

    def _check_complete(self, row_idx: np.ndarray, data: Mapping[str, np.ndarray]) -> None:
        """A missing chunk reads back as the fill value, which written data never holds (NaN, or a class id
        -1 on a valid row): raise StoreError naming the array, shard and rows instead of returning it."""
        if self.store.schema_version < 2 or not len(row_idx):
            return  # schema 1 fills with zeros: missing chunks are not detectable there
        valid = None
        for path, values in data.items():
            flat = values.reshape(len(row_idx), -1)
            if np.issubdtype(values.dtype, np.floating):
                bad = np.isnan(flat).any(1)
            else:
                if valid is None:
                    shard, valid = self.store.shard_of_rows(row_idx), np.zeros(len(row_idx), bool)
                    for i in np.unique(shard):  # rows were checked to lie in done shards
                        sr, at = self.store.shard_rows(int(i)), np.flatnonzero(shard == i)
                        valid[at] = sr.valid[row_idx[at] - sr.first_row]
                bad = (flat < 0).any(1) & valid
            if bad.any():
                self._raise_missing(path, row_idx[bad])

    def _raise_missing(self, path: str, rows: np.ndarray, cause: str = "missing chunk (reads back as the fill value)"):
        shards = np.unique(self.store.shard_of_rows(rows))
        names = ", ".join(f"{int(i)} ({self.store.shard(int(i)).url})" for i in shards[:3] if i >= 0)
        raise StoreCorrupt(f"{self.store.path}: labelers/{self.name}/{path}: {cause} at rows "
                           f"{rows[:5].tolist()}{' ...' if len(rows) > 5 else ''} of shard {names}; "
                           f"run `stl-labels verify {self.store.path} --repair`, then `stl-labels generate` again")

    def _gather_reads(self, selection: tuple, basic: bool) -> dict[str, np.ndarray]:
        """Read the same selection from every per-view array concurrently (one event-loop round trip
        instead of one per array: each zarr call costs milliseconds of latency, the data microseconds)."""
        paths = list(labeler_arrays(self.spec))
        arrays = [self.array(p).async_array for p in paths]

        async def read_all() -> list:
            return await asyncio.gather(*(a.getitem(selection) if basic else a.get_orthogonal_selection(selection)
                                          for a in arrays), return_exceptions=True)
        results = sync(read_all())
        for p, r in zip(paths, results):
            if isinstance(r, (ValueError, RuntimeError)):  # crc32c mismatch, truncated zstd chunk
                rows = selection[0]
                rows = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else np.asarray(rows)
                self._raise_missing(p, rows, f"damaged chunk ({type(r).__name__}: {r})")
            if isinstance(r, BaseException):
                raise r
        return {p: np.asarray(r) for p, r in zip(paths, results)}

    def _check_rows_done(self, row_idx: np.ndarray) -> None:
        if not len(row_idx):
            return
        shard = self.store.shard_of_rows(row_idx)
        if np.any(shard < 0):
            bad = int(row_idx[np.flatnonzero(shard < 0)[0]])
            raise StoreError(f"labeler {self.name!r}: row {bad} is not a sample row (padding or beyond the store)")
        done = self.done_mask()
        not_done = np.unique(shard[~done[shard]])
        if len(not_done):
            raise StoreError(f"labeler {self.name!r}: shards {not_done[:10].tolist()} are not done yet "
                             f"(missing: {len(self.missing_shards())} of {len(done)})")

    def errors(self, shards: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Recorded per-sample problems of done shards (all, or those in `shards`): [{shard, row, key, reason}]."""
        out = []
        keys, reasons = self.store.samples.key, self.array(ERRORS)
        done = np.flatnonzero(self.done_mask())
        if shards is not None:
            done = np.intersect1d(done, np.fromiter(shards, np.int64))
        for i in done:
            info = self.store.shard(int(i))
            r = np.asarray(reasons[info.first_row:info.stop])
            for j in np.flatnonzero(r != ""):
                row = info.first_row + int(j)
                out.append({"shard": int(i), "row": row, "key": str(keys[row]), "reason": str(r[j])})
        return out


def _assemble(spec: LabelerSpec, data: Mapping[str, np.ndarray]) -> dict[str, Any]:
    if spec.dense:
        return {"params": data[PARAMS], "tokens": EncodedLogits(data[TOKENS_DENSE]), "cls": EncodedLogits(data[CLS_DENSE])}
    return {"params": data[PARAMS], "tokens": EncodedLogits(*(data[p] for p in TOKENS_TOPK)),
            "cls": EncodedLogits(*(data[p] for p in CLS_TOPK))}


def _validate(spec: LabelerSpec, info: ShardInfo, keys: list, labels: Any, image_hw: Any, valid: Any, params: Any,
              tokens: EncodedLogits, cls: EncodedLogits, errors: list, fingerprints: Any = None) -> dict[str, Any]:
    """Check a shard write completely and return the padded arrays to store (nothing is written here)."""
    where = f"labeler {spec.name!r}, shard {info.index} ({info.url})"

    def fail(msg: str) -> None:
        raise InvalidLabels(f"{where}: {msg}")

    n, alloc, s, t = len(keys), info.end - info.first_row, spec.views, spec.num_tokens
    if n > info.num_samples:
        raise ShardCapacityError(f"{where}: {n} samples given but the shard was registered with {info.num_samples}")
    if n == 0:
        fail("no samples given")
    if not all(isinstance(k, str) and k for k in keys):
        fail("every key must be a non-empty string")
    if len(set(keys)) != n:
        dup = next(k for k in keys if keys.count(k) > 1)
        fail(f"duplicate key {dup!r}")

    def arr(x: Any, name: str, shape: tuple, kind: str) -> np.ndarray:
        a = np.asarray(x)
        if a.shape != shape:
            fail(f"{name} has shape {a.shape}, expected {shape}")
        if kind == "int" and not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            fail(f"{name} must be integers, got dtype {a.dtype}")
        return a

    valid = arr(valid, "valid", (n,), "any").astype(bool)
    labels = arr(labels, "labels", (n,), "int").astype(np.int64)
    out_of_range = (labels < -1) | (labels >= spec.num_classes)
    if out_of_range.any():  # one bad `.cls` is that sample's problem, not the shard's
        valid = valid & ~out_of_range
        have_reason = {e.get("key") for e in errors if isinstance(e, Mapping)}
        errors = errors + [{"key": keys[i], "reason": f"class label {int(labels[i])} of key {keys[i]!r} is outside "
                                                      f"[0, {spec.num_classes})"}
                           for i in np.flatnonzero(out_of_range) if keys[i] not in have_reason]
        labels = np.where(out_of_range, -1, labels)
    if fingerprints is None:
        fingerprints = np.zeros(n, np.uint64)
    fingerprints = arr(fingerprints, "fingerprints", (n,), "int").astype(np.uint64)
    image_hw = arr(image_hw, "image_hw", (n, 2), "int").astype(np.int64)
    if np.any(image_hw[valid] < 1):
        fail(f"valid row {keys[int(np.flatnonzero(valid & np.any(image_hw < 1, 1))[0])]!r} has a non-positive image_hw")
    params = arr(params, "params", (n, s, NUM_PARAMS), "any").astype(np.float32)
    pv = params[valid]
    if not np.all(np.isfinite(pv)):
        fail("params contain NaN/inf")
    if pv.size:
        x, y, w, h = (pv[..., i] for i in range(4))
        hw = image_hw[valid][:, None, :]
        box_ok = (x >= 0) & (y >= 0) & (w >= 1) & (h >= 1) & (x + w <= hw[..., 1]) & (y + h <= hw[..., 0])
        if not np.all(box_ok):
            fail("a view's crop box lies outside its image (params do not match image_hw)")

    arrays: dict[str, np.ndarray] = {PARAMS: _pad(np.where(valid[:, None, None], params, 0), alloc, 0)}
    for enc, lead, label, paths in ((tokens, (n, s, t), "tokens", (TOKENS_DENSE,) + TOKENS_TOPK),
                                    (cls, (n, s), "cls", (CLS_DENSE,) + CLS_TOPK)):
        if not isinstance(enc, EncodedLogits):
            fail(f"{label} must be an EncodedLogits, got {type(enc).__name__}")
        if enc.dense != spec.dense:
            fail(f"{label} is {'dense' if enc.dense else 'top-k'} but the labeler stores "
                 f"{'dense logits' if spec.dense else f'top-{spec.topk}'}")
        width = spec.num_classes if spec.dense else spec.topk
        logit = arr(enc.logit, f"{label} logits", lead + (width,), "any")
        with np.errstate(over="ignore", invalid="ignore"):
            logit16 = logit.astype(np.float16)
        if not np.all(np.isfinite(logit16[valid])):
            fail(f"{label} logits contain NaN/inf (or exceed the float16 range)")
        vmask = valid.reshape((n,) + (1,) * (len(lead) - 1))
        if spec.dense:
            arrays[paths[0]] = _pad(np.where(vmask[..., None], logit16, 0), alloc, 0)
            continue
        ids = arr(enc.cls, f"{label} class ids", lead + (width,), "int")
        iv = ids[valid].astype(np.int64)
        if iv.size and (iv.min() < 0 or iv.max() >= spec.num_classes):
            fail(f"{label} class ids must be in [0, {spec.num_classes}), got range [{iv.min()}, {iv.max()}]")
        if width > 1 and iv.size and np.any(np.diff(np.sort(iv, -1), axis=-1) == 0):
            fail(f"{label} top-k class ids repeat within one position")
        tail = arr(enc.tail_lse, f"{label} tail_lse", lead, "any")
        with np.errstate(over="ignore", invalid="ignore"):
            tail16 = tail.astype(np.float16)
        tv = tail16[valid]
        if np.any(np.isnan(tv)) or np.any(tv == np.inf):
            fail(f"{label} tail_lse contains NaN/+inf (or exceeds the float16 range)")
        arrays[paths[1]] = _pad(np.where(vmask[..., None], logit16, 0), alloc, 0)
        arrays[paths[2]] = _pad(np.where(vmask[..., None], ids, -1).astype(spec.class_dtype), alloc, -1)
        arrays[paths[3]] = _pad(np.where(vmask, tail16, 0), alloc, 0)

    reasons = np.full(alloc, "", dtype=object)
    position = {k: i for i, k in enumerate(keys)}
    for e in errors:
        if not isinstance(e, Mapping) or "key" not in e or "reason" not in e:
            fail(f"errors entries must be {{'key': ..., 'reason': ...}}, got {e!r}")
        if e["key"] not in position:
            fail(f"error record for unknown key {e['key']!r}")
        reasons[position[e["key"]]] = str(e["reason"]) or "invalid"
    return {
        "key": _pad(np.array(keys, dtype=object), alloc, ""),
        "label": _pad(labels.astype(np.int32), alloc, -1),
        "image_hw": _pad(np.where(valid[:, None], image_hw, 0).astype(np.int32), alloc, 0),
        "valid": _pad(valid, alloc, False),
        FINGERPRINT: _pad(fingerprints, alloc, 0),
        "arrays": arrays,
        "errors": reasons,
    }


def _pad(a: np.ndarray, rows: int, fill: Any) -> np.ndarray:
    """Pad the row axis to the shard's allocated rows (whole write units)."""
    if a.shape[0] == rows:
        return a
    out = np.full((rows,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
