"""Reference (numpy) token-label sampler over a top-k encoding; the trainer's torch version is tested
against it.

The encoding defines a full categorical over C classes: the K stored classes with their exact
probabilities, and the tail mass exp(tail_lse − Z) spread uniformly over the C − K other classes
(the tail's shape is not stored). Gumbel-max over the K + 1 outcomes {top-k, tail} then a uniform class
outside the top-k for a tail draw is an exact draw from that categorical.
"""
from __future__ import annotations

import numpy as np

from .codec import EncodedLogits, _lse
from .errors import InvalidLabels

MODES = ("gumbel", "softmax", "argmax")


def _uniform_outside(topk_cls: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform class per position from {0..C-1} minus that position's top-k classes."""
    k = topk_cls.shape[-1]
    c = rng.integers(0, num_classes - k, size=topk_cls.shape[:-1])
    # Walk the excluded ids in ascending order, shifting past each one at or below the candidate.
    for s in np.moveaxis(np.sort(topk_cls.astype(np.int64), axis=-1), -1, 0):
        c = c + (s <= c)
    return c


def sample_token_labels(enc: EncodedLogits, num_classes: int, mode: str = "gumbel",
                        rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Token labels from an encoding with leading shape (...).

    gumbel → int64 class ids (...), a draw from the encoded categorical (τ = 1, hard);
    argmax → int64 top-1 class ids (...); softmax → float32 probabilities (..., num_classes).
    """
    if mode not in MODES:
        raise InvalidLabels(f"sample_token_labels: mode must be one of {MODES}, got {mode!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    z = np.asarray(enc.logit, np.float32)
    if enc.dense:
        if z.shape[-1] != num_classes:
            raise InvalidLabels(f"dense logits have {z.shape[-1]} classes, expected num_classes={num_classes}")
        if mode == "softmax":
            return np.exp(z - _lse(z)[..., None]).astype(np.float32)
        if mode == "argmax":
            return z.argmax(-1).astype(np.int64)
        return (z + rng.gumbel(size=z.shape)).argmax(-1).astype(np.int64)

    cls = np.asarray(enc.cls).astype(np.int64)
    k = cls.shape[-1]
    if k > num_classes or (cls.size and (cls.min() < 0 or cls.max() >= num_classes)):
        raise InvalidLabels(f"class ids must lie in [0, {num_classes}) with K <= num_classes")
    tail = np.asarray(enc.tail_lse, np.float32)
    if mode == "argmax":
        return np.take_along_axis(cls, z.argmax(-1)[..., None], -1)[..., 0]
    if mode == "softmax":
        log_z = np.logaddexp(_lse(z), tail)
        probs = np.zeros(z.shape[:-1] + (num_classes,), np.float32)
        if num_classes > k:
            probs += (np.exp(tail - log_z) / (num_classes - k))[..., None]
        np.put_along_axis(probs, cls, np.exp(z - log_z[..., None]), -1)
        return probs
    scores = np.concatenate([z, tail[..., None]], -1) + rng.gumbel(size=z.shape[:-1] + (k + 1,))
    win = scores.argmax(-1)
    picked = np.take_along_axis(cls, np.minimum(win, k - 1)[..., None], -1)[..., 0]
    if num_classes == k:
        return picked  # tail is empty (lse = -inf) and never wins
    return np.where(win == k, _uniform_outside(cls, num_classes, rng), picked)
