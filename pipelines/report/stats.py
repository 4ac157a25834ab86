"""Token-label quality statistics as pure numpy functions (no I/O), used by `stl-labels report`.

A stored token distribution is top-k log-probabilities plus one tail mass (everything outside the top-k),
see docs/design.md "Store layout". Where a number needs the probability of a class outside the top-k we
spread the tail uniformly over the C − K missing classes, the same assumption the Gumbel sampler makes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labelstore import topk_log_probs


@dataclass(frozen=True)
class TokenDist:
    """Per-token (or per-image) distributions: `classes` (..., K) int, `logp` (..., K) exact log-probs of
    those classes, `tail_logp` (...) log of the probability mass outside them (-inf when dense)."""

    classes: np.ndarray
    logp: np.ndarray
    tail_logp: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.classes.shape != self.logp.shape or self.logp.shape[:-1] != self.tail_logp.shape:
            raise ValueError(f"TokenDist shapes disagree: classes {self.classes.shape}, logp {self.logp.shape}, "
                             f"tail_logp {self.tail_logp.shape}")
        if self.logp.shape[-1] > self.num_classes:
            raise ValueError(f"TokenDist holds {self.logp.shape[-1]} classes but num_classes={self.num_classes}")


def token_dist(enc, num_classes: int) -> TokenDist:
    """`labelstore.EncodedLogits` -> TokenDist (dense: all classes, empty tail)."""
    logit = np.asarray(enc.logit, np.float64)
    if enc.cls is None:  # dense: a plain log-softmax, nothing outside
        lse = np.logaddexp.reduce(logit, axis=-1, keepdims=True)
        classes = np.broadcast_to(np.arange(logit.shape[-1]), logit.shape)
        return TokenDist(classes, logit - lse, np.full(logit.shape[:-1], -np.inf), num_classes)
    return TokenDist(np.asarray(enc.cls).astype(np.int64), np.asarray(topk_log_probs(enc), np.float64),
                     _tail_logp(logit, np.asarray(enc.tail_lse, np.float64)), num_classes)


def _tail_logp(topk_logit: np.ndarray, tail_lse: np.ndarray) -> np.ndarray:
    # log P(tail) = tail_lse − log(Σ_topk e^logit + e^tail_lse)
    return tail_lse - np.logaddexp(np.logaddexp.reduce(topk_logit, axis=-1), tail_lse)


def confidence(d: TokenDist) -> np.ndarray:
    """Max probability per token (paper Fig. 2e). Exact: the top-1 is always inside the stored top-k."""
    return np.exp(d.logp.max(axis=-1))


def argmax_labels(d: TokenDist) -> np.ndarray:
    idx = d.logp.argmax(axis=-1)
    return np.take_along_axis(d.classes, idx[..., None], axis=-1)[..., 0]


def tail_mass(d: TokenDist) -> np.ndarray:
    """Probability the stored top-k misses (0 when dense)."""
    return np.exp(d.tail_logp)


def class_prob(d: TokenDist, label: np.ndarray) -> np.ndarray:
    """P(token = label) with `label` broadcast over the token axes; tail spread uniformly outside the top-k."""
    label = np.asarray(label)[..., None]
    while label.ndim < d.classes.ndim:
        label = label[..., None, :]
    hit = d.classes == label
    in_topk = np.where(hit, np.exp(d.logp), 0.0).sum(axis=-1)
    missing = d.num_classes - d.classes.shape[-1]
    outside = tail_mass(d) / missing if missing > 0 else np.zeros(in_topk.shape)
    return np.where(hit.any(axis=-1), in_topk, outside)


def pool_mask_to_grid(mask: np.ndarray, grid: tuple[int, int], value: int = 1) -> np.ndarray:
    """Share of each token's pixels equal to `value`: (..., H, W) -> (..., gh, gw) area pooling.

    Token (i, j) covers rows [⌊iH/gh⌋, ⌊(i+1)H/gh⌋), the same split whether or not gh divides H.
    """
    gh, gw = grid
    h, w = mask.shape[-2:]
    if gh > h or gw > w:
        raise ValueError(f"token grid {grid} is finer than the mask ({h}, {w})")
    hit = (mask == value).astype(np.float64)
    rows, cols = (np.arange(gh) * h) // gh, (np.arange(gw) * w) // gw
    sums = np.add.reduceat(np.add.reduceat(hit, rows, axis=-2), cols, axis=-1)
    areas = np.diff(np.append(rows, h))[:, None] * np.diff(np.append(cols, w))[None, :]
    return sums / areas


def foreground_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Token foreground prediction vs ground truth (both bool, any shape), counted over all tokens.

    IoU = |pred ∧ truth| / |pred ∨ truth| (micro: one ratio over every token of every image).
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    tn = int((~pred & ~truth).sum())

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    return {"accuracy": ratio(tp + tn, tp + fp + fn + tn), "iou": ratio(tp, tp + fp + fn),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "tokens": tp + fp + fn + tn}


def histogram(values: np.ndarray, bins: int = 20, value_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Fractions per bin (sum 1 when any value falls in range) and the bin edges, JSON-ready."""
    counts, edges = np.histogram(np.asarray(values, np.float64).ravel(), bins=bins, range=value_range)
    total = counts.sum()
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "fractions": [float(c / total) if total else 0.0 for c in counts]}


def summary(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.quantile(v, 0.9)), "max": float(v.max())}


def change_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Share of positions where two label maps differ (e.g. a Gumbel draw vs the argmax)."""
    a, b = np.asarray(a), np.asarray(b)
    return float((a != b).mean()) if a.size else float("nan")
