"""`verify_store`: a full consistency check of a store (what `stl-labels verify` runs), and `repair_store`.

Checks the sample index (shard alignment, array sizes, keys), and for every labeler: array shapes and
dtypes against its spec, then every chunk of every done shard — one write unit of rows at a time, each
array on its own, so a damaged chunk (checksum mismatch, truncated compression) is reported and the
check goes on. Missing chunks read back as fill values that written data never holds (NaN, class id -1
on a valid row, label -2, an empty key, a row neither valid nor given a reason): each is a problem.
(A missing samples/fingerprint chunk only reads as "no fingerprint": those rows' inputs go unchecked.)
Also keys present and unique, padding empty, labels and class ids in range, no NaN/inf, top-k ids
distinct, view params inside their image and spec ranges. Shards not yet done are not problems (the job
is resumable); callers report them separately. `repair_store` clears `done` of every shard with a
problem, so the next `generate` relabels exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import StoreError
from .schema import DONE, ERRORS, LabelerSpec, labeler_arrays
from .store import LabelStore
from .views import NUM_PARAMS, view_param_faults

MAX_PROBLEMS_PER_CHECK = 5  # rows named per problem: enough to locate a fault without flooding the terminal


@dataclass(frozen=True)
class Problem:
    """One fault: what is wrong, where (labeler, shard; None when store-wide)."""

    text: str
    labeler: str | None = None
    shard: int | None = None

    def __str__(self) -> str:
        return self.text


def verify_store(path: str | LabelStore, labeler: str | None = None) -> list[str]:
    """Every problem found, as readable lines naming labeler, shard, array and row; [] when the store is sound."""
    return [str(p) for p in find_problems(path, labeler)]


def find_problems(path: str | LabelStore, labeler: str | None = None) -> list[Problem]:
    try:
        store = path if isinstance(path, LabelStore) else LabelStore.open(path, mode="r")
        store.shards
    except (StoreError, KeyError, ValueError, OSError) as e:
        return [Problem(f"cannot open store: {e}")]
    problems = _check_samples(store)
    names = store.labelers()
    if labeler is not None and labeler not in names:
        return problems + [Problem(f"no labeler {labeler!r} in store (has {names})")]
    for name in [labeler] if labeler is not None else names:
        problems += _check_labeler(store, name)
    return problems


def repair_store(path: str, labeler: str | None = None) -> tuple[list[Problem], dict[str, list[int]]]:
    """Find problems, then mark every damaged done shard not done: (problems, {labeler: shards cleared})."""
    problems = find_problems(path, labeler)
    cleared: dict[str, list[int]] = {}
    for p in problems:
        if p.labeler is not None and p.shard is not None and p.shard not in cleared.get(p.labeler, []):
            cleared.setdefault(p.labeler, []).append(p.shard)
    if cleared:
        store = LabelStore.open(path, mode="r+")
        for name, shards in cleared.items():
            done = store.labeler(name).array(DONE)
            for i in shards:
                done[i] = 0
    return problems, {k: sorted(v) for k, v in cleared.items()}


def _check_samples(store: LabelStore) -> list[Problem]:
    out, rows, rpc, prev_end, seen = [], store.num_rows, store.rows_per_chunk, 0, set()
    for s in store.shards:
        if s.first_row != prev_end or s.first_row % rpc:
            out.append(Problem(f"samples: shard {s.index} ({s.url}) starts at row {s.first_row}, expected {prev_end} "
                               f"(a multiple of rows_per_chunk={rpc})"))
        if s.identity in seen:
            out.append(Problem(f"samples: shard {s.identity!r} registered twice"))
        seen.add(s.identity)
        prev_end = s.end
    for name in ("key", "label", "image_hw", "valid", "fingerprint"):
        arr = store.samples[name]
        if arr is not None and arr.shape[0] != rows:
            out.append(Problem(f"samples/{name}: {arr.shape[0]} rows, expected {rows}"))
    return out


def _check_labeler(store: LabelStore, name: str) -> list[Problem]:
    where = f"labelers/{name}"
    try:
        lab = store.labeler(name)
    except (StoreError, KeyError, TypeError, ValueError) as e:
        return [Problem(f"{where}: cannot read spec: {e}", name)]
    spec, out = lab.spec, []
    expected = {p: ((store.num_rows, spec.views) + tail, dtype) for p, (tail, dtype, _) in labeler_arrays(spec).items()}
    expected[ERRORS] = ((store.num_rows,), None)
    expected[DONE] = ((len(store.shards),), np.dtype(np.uint8))
    for path, (shape, dtype) in expected.items():
        try:
            arr = lab.array(path)
        except KeyError:
            out.append(Problem(f"{where}/{path}: array missing", name))
            continue
        if tuple(arr.shape) != shape:
            out.append(Problem(f"{where}/{path}: shape {tuple(arr.shape)}, expected {shape}", name))
        if dtype is not None and np.dtype(arr.dtype) != dtype:
            out.append(Problem(f"{where}/{path}: dtype {arr.dtype}, expected {dtype}", name))
    if out:
        return out
    try:
        done = lab.done_mask()
    except (ValueError, RuntimeError) as e:
        return [Problem(f"{where}/done: damaged ({type(e).__name__}: {e})", name)]
    for i in np.flatnonzero(done):
        out += [Problem(text, name, int(i)) for text in _check_shard(store, lab, spec, int(i))]
    return out


def _read(arr: Any, rows: slice, label: str, fail: Callable[[str], None]) -> np.ndarray | None:
    """One write unit of one array; a damaged chunk is a problem, not a crash."""
    try:
        return np.asarray(arr[rows])
    except (ValueError, RuntimeError, OSError) as e:  # crc32c mismatch, "Zstd decompression error", ...
        fail(f"{label}: damaged chunk at rows {rows.start}..{rows.stop - 1} ({type(e).__name__}: {e})")
        return None


def _check_shard(store: LabelStore, lab: Any, spec: LabelerSpec, i: int) -> list[str]:
    info = store.shard(i)
    where = f"labelers/{spec.name} shard {i} ({info.url})"
    out: list[str] = []
    for start in range(info.first_row, info.end, store.rows_per_chunk):  # one write unit (chunk file) at a time
        out += _check_unit(store, lab, spec, info, where, slice(start, start + store.rows_per_chunk))
    return out


def _check_unit(store: LabelStore, lab: Any, spec: LabelerSpec, info: Any, where: str, rows: slice) -> list[str]:
    out: list[str] = []
    fail = lambda msg: out.append(f"{where}: {msg}")  # noqa: E731
    first_sample_row = info.first_row

    def bad(msg: str, mask: np.ndarray) -> None:
        hit = np.flatnonzero(mask)
        if len(hit):
            shown = [rows.start + int(r) for r in hit[:MAX_PROBLEMS_PER_CHECK]]
            out.append(f"{where}: {msg} at rows {shown}{' ...' if len(hit) > len(shown) else ''} ({len(hit)} rows)")

    smp = {n: _read(store.samples[n], rows, f"samples/{n}", fail)
           for n in ("key", "label", "image_hw", "valid", "fingerprint") if store.samples[n] is not None}
    reasons = _read(lab.array(ERRORS), rows, f"{ERRORS}", fail)
    if any(v is None for v in smp.values()) or reasons is None:
        return out
    keys, valid = smp["key"], smp["valid"].astype(bool)
    is_sample = (np.arange(rows.start, rows.stop) - first_sample_row) < info.num_samples
    written = keys != ""
    if rows.start == info.first_row and not written.any():
        return [f"{where}: marked done but its sample rows are empty (missing chunk, or done written before data)"]
    missing_word = "missing chunk" if store.schema_version >= 2 else "empty"
    bad(f"samples/key: {missing_word} (sample row without a key)", is_sample & ~written)
    bad("padding row has a key or is valid", (written | valid) & ~is_sample)
    bad("valid row without a key", valid & ~written)
    if store.schema_version >= 2:
        bad("samples/valid or errors: missing chunk (row neither valid nor given a reason)",
            is_sample & written & ~valid & (reasons == ""))
    ks = keys[written]
    if len(set(ks.tolist())) != len(ks):
        out.append(f"{where}: duplicate keys in the shard")
    bad(f"label outside [-1, {spec.num_classes}) (a missing samples/label chunk reads -2)",
        is_sample & ((smp["label"] < -1) | (smp["label"] >= spec.num_classes)))
    bad("valid row with a non-positive image_hw (missing samples/image_hw chunk?)",
        valid & np.any(smp["image_hw"] < 1, axis=1))

    for path in labeler_arrays(spec):
        a = _read(lab.array(path), rows, path, fail)
        if a is None:
            continue
        per_row = lambda m: m.reshape(m.shape[0], -1).any(1) & valid  # noqa: E731
        if np.issubdtype(a.dtype, np.floating) and store.schema_version >= 2:
            bad(f"{path}: missing chunk (NaN fill)", np.isnan(a).reshape(a.shape[0], -1).any(1) & is_sample)
        if path.endswith("topk_class"):
            a64 = a.astype(np.int64)
            bad(f"{path}: missing chunk (class id -1 on a valid row)", per_row(a64 == -1))
            bad(f"{path}: class id outside [0, {spec.num_classes})", per_row((a64 < -1) | (a64 >= spec.num_classes)))
            if a.shape[-1] > 1:
                bad(f"{path}: repeated class id within a top-k", per_row(np.diff(np.sort(a64, -1), axis=-1) == 0))
        elif path.endswith("tail_lse"):
            bad(f"{path}: NaN/+inf", per_row(np.isnan(a) | (a == np.inf)))
        elif path == "views/params":
            _check_params(a, smp["image_hw"], valid, spec, bad)
        else:
            bad(f"{path}: NaN/inf", per_row(~np.isfinite(a)))
    return out


def _check_params(p: np.ndarray, image_hw: np.ndarray, valid: np.ndarray, spec: LabelerSpec, bad: Any) -> None:
    """views.view_param_faults over (rows, S, P), a row flagged when any of its views is; reports through `bad`."""
    assert p.shape[-1] == NUM_PARAMS
    p = np.where(valid[:, None, None], p, 0)  # invalid rows are not checked (and their NaN is reported above)
    for problem, mask in view_param_faults(p, image_hw[:, None, :], spec.view_spec).items():
        bad(f"views/params: {problem}", mask.any(1) & valid)
