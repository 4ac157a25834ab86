"""What a label store and a labeler in it are: specs, shard records, layout names, chunk shapes.

Pure data; no I/O. The on-disk layout is described in docs/store-format.md.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .codec import class_id_dtype
from .errors import SchemaMismatch, StoreError, ViewSpecError
from .views import NUM_PARAMS, ViewSpec

FORMAT = "stl-labels"
SCHEMA_VERSION = 2  # 2: samples/fingerprint, fill values no valid data takes, shard names (docs/store-format.md)
READABLE_SCHEMA_VERSIONS = (1, 2)  # schema 1 stores are read (no fingerprints, missing chunks read as zeros)
DEFAULT_ROWS_PER_CHUNK = 256
CHUNK_TARGET_BYTES = 1 << 20  # one view index for a block of rows ≈ 1 MiB (docs/design.md "Store layout")

# Array paths inside labelers/<name>/ (docs/store-format.md).
PARAMS = "views/params"
TOKENS_TOPK = ("tokens/topk_logit", "tokens/topk_class", "tokens/tail_lse")
CLS_TOPK = ("cls/topk_logit", "cls/topk_class", "cls/tail_lse")
TOKENS_DENSE = "tokens/logits"
CLS_DENSE = "cls/logits"
ERRORS = "errors"  # (rows,) str: why a row is invalid ("" = fine)
DONE = "done"  # (num_shards,) uint8, one chunk per shard, written last
SAMPLE_ARRAYS = ("key", "label", "image_hw", "valid")
FINGERPRINT = "fingerprint"  # samples/fingerprint (rows,) uint64: image_fingerprint of the encoded image, 0 = none
# Fill values no written data takes, so a chunk file that is missing reads back as something detectable
# (zarr reads a missing chunk as the fill value, silently; docs/store-format.md "Missing is never zero").
LABEL_FILL = -2  # labels are in [-1, C)
FLOAT_FILL = float("nan")  # logits, tail_lse and params are finite (invalid rows are written as 0)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ShardInfo:
    """One registered input shard: its rows are [first_row, first_row + num_samples)."""

    index: int
    url: str  # where it was when registered (informational; the identity is `name`)
    first_row: int
    num_samples: int
    rows_per_chunk: int
    name: str = ""  # path relative to the dataset root at registration: the shard's identity ("" = url, schema 1)
    first_key: str = ""
    last_key: str = ""

    @property
    def stop(self) -> int:
        return self.first_row + self.num_samples

    @property
    def end(self) -> int:
        """End of the rows allocated to this shard (a write-unit boundary; padding rows are invalid)."""
        return self.first_row + max(1, math.ceil(self.num_samples / self.rows_per_chunk)) * self.rows_per_chunk

    @property
    def rows(self) -> slice:
        return slice(self.first_row, self.stop)

    @property
    def identity(self) -> str:
        return self.name or self.url

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "first_row": self.first_row, "num_samples": self.num_samples, "name": self.name,
                "first_key": self.first_key, "last_key": self.last_key}

    @classmethod
    def from_dict(cls, index: int, d: Mapping[str, Any], rows_per_chunk: int) -> "ShardInfo":
        return cls(index, d["url"], int(d["first_row"]), int(d["num_samples"]), rows_per_chunk,
                   str(d.get("name", "")), str(d.get("first_key", "")), str(d.get("last_key", "")))


def _tuple(value: Any, n: int, kind: type, field: str) -> tuple:
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError) as e:
        raise StoreError(f"LabelerSpec.{field} must be {n} {kind.__name__} values, got {value!r}") from e
    if len(out) != n:
        raise StoreError(f"LabelerSpec.{field} must have {n} values, got {value!r}")
    return out


@dataclass(frozen=True)
class LabelerSpec:
    """Everything that defines one labeler's outputs; stored as the attrs of labelers/<name>/."""

    name: str
    arch: str
    num_classes: int
    input_size: tuple[int, int]  # (h, w) = view_spec.size
    grid: tuple[int, int]  # (gh, gw) token grid, T = gh * gw (from the model, never sqrt(T))
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    view_spec: ViewSpec
    views: int  # S views per sample
    topk: int  # K; 0 = dense float16 logits
    seed: int | None = None  # seed of the view params; None = the store's seed (filled by add_labeler)
    checkpoint_sha256: str = ""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise JSON lists)
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise StoreError(f"LabelerSpec.name {self.name!r} must match {_NAME_RE.pattern} (it is a group name)")
        set_("input_size", _tuple(self.input_size, 2, int, "input_size"))
        set_("grid", _tuple(self.grid, 2, int, "grid"))
        set_("mean", _tuple(self.mean, 3, float, "mean"))
        set_("std", _tuple(self.std, 3, float, "std"))
        if isinstance(self.view_spec, Mapping):
            set_("view_spec", ViewSpec.from_dict(dict(self.view_spec)))
        if not isinstance(self.view_spec, ViewSpec):
            raise StoreError(f"LabelerSpec.view_spec must be a ViewSpec, got {type(self.view_spec).__name__}")
        for f in ("num_classes", "views", "topk"):
            if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), (int, np.integer)):
                raise StoreError(f"LabelerSpec.{f} must be an int, got {getattr(self, f)!r}")
            set_(f, int(getattr(self, f)))
        problems = [
            (self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}"),
            (min(self.input_size) >= 1, f"input_size must be positive, got {self.input_size}"),
            (min(self.grid) >= 1, f"grid must be positive, got {self.grid}"),
            (min(self.std) > 0, f"std must be > 0, got {self.std}"),
            (self.views >= 1, f"views must be >= 1, got {self.views}"),
            (0 <= self.topk <= self.num_classes, f"topk must be in 0..num_classes ({self.num_classes}), got {self.topk}"),
            (self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), f"seed must be an int >= 0, got {self.seed!r}"),
            (tuple(self.view_spec.size) == self.input_size,
             f"view_spec.size {self.view_spec.size} must equal input_size {self.input_size} (views are the teacher input)"),
            (isinstance(self.arch, str) and self.arch != "", f"arch must be a non-empty string, got {self.arch!r}"),
            (isinstance(self.checkpoint_sha256, str), f"checkpoint_sha256 must be a string, got {self.checkpoint_sha256!r}"),
        ]
        for ok, msg in problems:
            if not ok:
                raise StoreError(f"LabelerSpec({self.name}).{msg}")

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def dense(self) -> bool:
        return self.topk == 0

    @property
    def class_dtype(self) -> np.dtype:
        return class_id_dtype(self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["view_spec"] = self.view_spec.to_dict()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelerSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StoreError(f"unknown LabelerSpec keys: {sorted(unknown)}")
        try:
            return cls(**dict(d))
        except TypeError as e:
            raise StoreError(f"LabelerSpec: {e}") from e
        except ViewSpecError as e:
            raise SchemaMismatch(f"LabelerSpec({d.get('name')}).view_spec: {e}") from e


def spec_diff(stored: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Readable lines for every field where `expected` differs from `stored` (only fields in `expected`)."""
    lines = []
    for key in sorted(expected):
        want, have = expected[key], stored.get(key, "<missing>")
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            lines += spec_diff(have, want, f"{prefix}{key}.")
        elif _norm(want) != _norm(have):
            lines.append(f"  {prefix}{key}: store has {_norm(have)!r}, expected {_norm(want)!r}")
    return lines


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, ViewSpec):
        return v.to_dict()
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def inner_chunk_rows(rows_per_chunk: int, bytes_per_row: int) -> int:
    """Largest divisor of rows_per_chunk whose chunk (one view, those rows) fits CHUNK_TARGET_BYTES."""
    best = 1
    for d in range(1, rows_per_chunk + 1):
        if rows_per_chunk % d == 0 and d * bytes_per_row <= CHUNK_TARGET_BYTES:
            best = d
    return best


def labeler_arrays(spec: LabelerSpec) -> dict[str, tuple[tuple[int, ...], np.dtype, Any]]:
    """Per-row shape tail (after rows, S), dtype and fill of every per-view array of a labeler."""
    t, k, c = spec.num_tokens, spec.topk, spec.num_classes
    nan = FLOAT_FILL
    out: dict[str, tuple[tuple[int, ...], np.dtype, Any]] = {PARAMS: ((NUM_PARAMS,), np.dtype(np.float32), nan)}
    if spec.dense:
        out[TOKENS_DENSE] = ((t, c), np.dtype(np.float16), nan)
        out[CLS_DENSE] = ((c,), np.dtype(np.float16), nan)
    else:
        for (lg, cl, tail), lead in ((TOKENS_TOPK, (t,)), (CLS_TOPK, ())):
            out[lg] = (lead + (k,), np.dtype(np.float16), nan)
            out[cl] = (lead + (k,), spec.class_dtype, -1)  # -1 on a valid row = missing (valid ids are >= 0)
            out[tail] = (lead, np.dtype(np.float16), nan)  # invalid rows and -inf tails are written, never NaN
    return out
