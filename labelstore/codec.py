"""Top-k codec: dense teacher logits → top-k logits + class ids + tail log-sum-exp.

Keeping lse(tail) next to the raw top-k logits makes the top-k log-probabilities exact (up to float16
storage): log p_i = z_i − logaddexp(lse(z_topk), lse(z_tail)). K = 0 keeps dense float16 logits.
This is the numpy reference; the labeler computes the same thing on its device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidLabels

FLOAT16_MAX = float(np.finfo(np.float16).max)


def class_id_dtype(num_classes: int) -> np.dtype:
    """int16 while every class id (and the -1 fill) fits, else int32."""
    if int(num_classes) < 1:
        raise InvalidLabels(f"num_classes must be >= 1, got {num_classes}")
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


@dataclass(frozen=True, eq=False)
class EncodedLogits:
    """Top-k logits (..., K) float16, class ids (..., K), tail lse (...) float16; dense: cls/tail None."""

    logit: np.ndarray
    cls: np.ndarray | None = None
    tail_lse: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.cls is None) != (self.tail_lse is None):
            raise InvalidLabels("EncodedLogits: cls and tail_lse must both be given (top-k) or both be None (dense)")
        if self.cls is not None:
            if np.shape(self.cls) != np.shape(self.logit):
                raise InvalidLabels(f"EncodedLogits: cls shape {np.shape(self.cls)} != logit shape {np.shape(self.logit)}")
            if np.shape(self.tail_lse) != np.shape(self.logit)[:-1]:
                raise InvalidLabels(f"EncodedLogits: tail_lse shape {np.shape(self.tail_lse)} != "
                                    f"{np.shape(self.logit)[:-1]} (logit shape without the last axis)")

    @property
    def dense(self) -> bool:
        return self.cls is None

    @property
    def k(self) -> int:
        """K (0 when dense)."""
        return 0 if self.dense else int(np.shape(self.logit)[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Leading shape (without the class/top-k axis)."""
        return tuple(np.shape(self.logit)[:-1])

    def __getitem__(self, index) -> "EncodedLogits":
        """Index the leading axes only, e.g. enc[:, 0] or enc[rows] (no Ellipsis: it would hit the K axis)."""
        if index is Ellipsis or (isinstance(index, tuple) and any(i is Ellipsis for i in index)):
            raise IndexError("EncodedLogits: index the leading axes explicitly (no Ellipsis)")
        if self.dense:
            return EncodedLogits(self.logit[index])
        return EncodedLogits(self.logit[index], self.cls[index], self.tail_lse[index])


def _lse(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis)


def encode_topk(logits: np.ndarray, k: int) -> EncodedLogits:
    """Encode dense logits (..., C) keeping the k largest (sorted descending; ties → lower class id)."""
    x = np.asarray(logits)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise InvalidLabels(f"encode_topk: logits must have a class axis, got shape {x.shape}")
    num_classes = x.shape[-1]
    if not 0 <= int(k) <= num_classes:
        raise InvalidLabels(f"encode_topk: k must be in 0..{num_classes} (num classes), got {k}")
    if not np.all(np.isfinite(x)):
        raise InvalidLabels("encode_topk: logits contain NaN/inf")
    if np.max(np.abs(x), initial=0.0) > FLOAT16_MAX:
        raise InvalidLabels(f"encode_topk: |logit| exceeds the float16 range ({FLOAT16_MAX})")
    if k == 0:
        return EncodedLogits(x.astype(np.float16))
    x = x.astype(np.float32, copy=False)
    part = np.argpartition(-x, k - 1, axis=-1)[..., :k] if k < num_classes else np.broadcast_to(
        np.arange(num_classes), x.shape).copy()
    part = np.sort(part, axis=-1)  # then a stable sort by value: equal logits keep class-id order
    vals = np.take_along_axis(x, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(part, order, -1)
    vals = np.take_along_axis(vals, order, -1)
    rest = x.copy()
    np.put_along_axis(rest, idx, -np.inf, -1)
    tail = _lse(rest) if k < num_classes else np.full(x.shape[:-1], -np.inf, np.float32)
    return EncodedLogits(vals.astype(np.float16), idx.astype(class_id_dtype(num_classes)), tail.astype(np.float16))


def topk_log_probs(enc: EncodedLogits) -> np.ndarray:
    """Exact log-probabilities of the stored classes, float32 (dense: log-softmax over all classes)."""
    z = np.asarray(enc.logit, np.float32)
    if enc.dense:
        return z - _lse(z)[..., None]
    return z - np.logaddexp(_lse(z), np.asarray(enc.tail_lse, np.float32))[..., None]
