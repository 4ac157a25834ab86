"""`verify_store`: a full consistency check of a store (what `stl-labels verify` runs).

Checks the sample index (shard alignment, array sizes, keys), and for every labeler: array shapes and
dtypes against its spec, then every done shard's data — keys present and unique, padding empty, labels
and class ids in range, no NaN/inf, top-k ids distinct, view params inside their image and spec ranges.
Shards not yet done are not problems (the job is resumable); callers report them separately.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import StoreError
from .schema import DONE, ERRORS, LabelerSpec, labeler_arrays
from .store import LabelStore
from .views import NUM_PARAMS, view_param_faults

MAX_PROBLEMS_PER_CHECK = 5  # enough to locate a fault without flooding the terminal


def verify_store(path: str | LabelStore, labeler: str | None = None) -> list[str]:
    """Every problem found, as readable lines naming labeler, shard, array and row; [] when the store is sound."""
    try:
        store = path if isinstance(path, LabelStore) else LabelStore.open(path, mode="r")
        store.shards
    except (StoreError, KeyError, ValueError, OSError) as e:
        return [f"cannot open store: {e}"]
    problems = _check_samples(store)
    names = store.labelers()
    if labeler is not None and labeler not in names:
        return problems + [f"no labeler {labeler!r} in store (has {names})"]
    for name in [labeler] if labeler is not None else names:
        problems += _check_labeler(store, name)
    return problems


def _check_samples(store: LabelStore) -> list[str]:
    out, rows, rpc, prev_end, seen = [], store.num_rows, store.rows_per_chunk, 0, set()
    for s in store.shards:
        if s.first_row != prev_end or s.first_row % rpc:
            out.append(f"samples: shard {s.index} ({s.url}) starts at row {s.first_row}, expected {prev_end} "
                       f"(a multiple of rows_per_chunk={rpc})")
        if s.url in seen:
            out.append(f"samples: shard url {s.url!r} registered twice")
        seen.add(s.url)
        prev_end = s.end
    for name in ("key", "label", "image_hw", "valid"):
        arr = store.samples[name]
        if arr.shape[0] != rows:
            out.append(f"samples/{name}: {arr.shape[0]} rows, expected {rows}")
    return out


def _check_labeler(store: LabelStore, name: str) -> list[str]:
    where = f"labelers/{name}"
    try:
        lab = store.labeler(name)
    except (StoreError, KeyError, TypeError, ValueError) as e:
        return [f"{where}: cannot read spec: {e}"]
    spec, out = lab.spec, []
    expected = {p: ((store.num_rows, spec.views) + tail, dtype) for p, (tail, dtype, _) in labeler_arrays(spec).items()}
    expected[ERRORS] = ((store.num_rows,), None)
    expected[DONE] = ((len(store.shards),), np.dtype(np.uint8))
    for path, (shape, dtype) in expected.items():
        try:
            arr = lab.array(path)
        except KeyError:
            out.append(f"{where}/{path}: array missing")
            continue
        if tuple(arr.shape) != shape:
            out.append(f"{where}/{path}: shape {tuple(arr.shape)}, expected {shape}")
        if dtype is not None and np.dtype(arr.dtype) != dtype:
            out.append(f"{where}/{path}: dtype {arr.dtype}, expected {dtype}")
    if out:
        return out
    done = lab.done_mask()
    for i in np.flatnonzero(done):
        out += _check_shard(store, lab, spec, int(i))
    return out


def _check_shard(store: LabelStore, lab: Any, spec: LabelerSpec, i: int) -> list[str]:
    info = store.shard(i)
    where = f"labelers/{spec.name} shard {i} ({info.url})"
    out: list[str] = []

    def bad(msg: str, rows: np.ndarray) -> None:
        rows = np.flatnonzero(rows)
        if len(rows):
            shown = [info.first_row + int(r) for r in rows[:MAX_PROBLEMS_PER_CHECK]]
            out.append(f"{where}: {msg} at rows {shown}{' ...' if len(rows) > len(shown) else ''} ({len(rows)} rows)")

    smp = store.read_samples(slice(info.first_row, info.end))
    keys, valid, n = smp["key"], smp["valid"].astype(bool), info.num_samples
    written = keys != ""
    if not written.any():
        return [f"{where}: marked done but its sample rows are empty (done written before data)"]
    bad("padding row has a key or is valid", (written | valid) & (np.arange(len(keys)) >= n))
    bad("valid row without a key", valid & ~written)
    ks = keys[written]
    if len(set(ks.tolist())) != len(ks):
        out.append(f"{where}: duplicate keys in the shard")
    bad(f"label outside [-1, {spec.num_classes})", (smp["label"] < -1) | (smp["label"] >= spec.num_classes))
    bad("valid row with a non-positive image_hw", valid & np.any(smp["image_hw"] < 1, axis=1))

    rows = slice(info.first_row, info.end)
    for path, (tail, _dtype, _fill) in labeler_arrays(spec).items():
        a = np.asarray(lab.array(path)[rows])
        per_row = lambda m: m.reshape(m.shape[0], -1).any(1) & valid  # noqa: E731
        if path.endswith("topk_class"):
            a64 = a.astype(np.int64)
            bad(f"{path}: class id outside [0, {spec.num_classes})", per_row((a64 < 0) | (a64 >= spec.num_classes)))
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
    for problem, mask in view_param_faults(p, image_hw[:, None, :], spec.view_spec).items():
        bad(f"views/params: {problem}", mask.any(1) & valid)

