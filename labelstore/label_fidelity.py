"""How far the sampler's categorical is from the teacher's full softmax, per token (pure numpy).

For a top-k encoding, the sampler draws from q: the K stored classes with their stored probabilities, and
the tail mass spread over the other C − K classes by a *tail model*. This module computes q exactly for a
given encoding and tail model and the total-variation distance TV(p, q) = ½ Σ_c |p_c − q_c| against the
teacher's softmax p; `stl-labels bench store` prints the table (docs/benchmarks.md).

Tail models (all a weight r_c >= 0 per class, renormalised over the token's tail classes):
- uniform: r_c = 1;
- cls: r = the view's stored image-level (cls) distribution (its top-k classes exact, the rest uniform);
Codecs: fp16 (top-k logits and tail lse as float16, what the store keeps) or u8 (logits as uint8 steps of
1/`U8_STEPS_PER_NAT` nat below the token's top-1, tail lse as int8 steps around it, since the tail can hold
more mass than the top-1: q includes the rounding).
"""
from __future__ import annotations

import numpy as np

from .codec import _lse, encode_topk

TAIL_MODELS = ("uniform", "cls")
CODECS = ("fp16", "u8")
U8_STEPS_PER_NAT = 16  # 255 steps cover 15.9 nats below the top-1: mass below e^-15.9 ≈ 1e-7 is clamped


def quantise_u8(logit: np.ndarray, tail_lse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k logits (..., K) and tail lse (...) → what a uint8 store would return (relative to the top-1)."""
    z = np.asarray(logit, np.float32)
    top = z[..., :1]
    q = np.clip(np.round((top - z) * U8_STEPS_PER_NAT), 0, 255)
    t = np.clip(np.round((top[..., 0] - np.asarray(tail_lse, np.float32)) * U8_STEPS_PER_NAT), -128, 127)
    return -q / U8_STEPS_PER_NAT, -t / U8_STEPS_PER_NAT


def cls_weights(cls_logits: np.ndarray, k: int) -> np.ndarray:
    """(..., C) class weights from a stored top-k cls encoding: exact top-k probabilities, the rest uniform."""
    c = cls_logits.shape[-1]
    enc = encode_topk(cls_logits, k)
    z, tail = enc.logit.astype(np.float32), enc.tail_lse.astype(np.float32)
    log_z = np.logaddexp(_lse(z), tail)
    r = np.broadcast_to((np.exp(tail - log_z) / max(c - k, 1))[..., None], cls_logits.shape).copy()
    np.put_along_axis(r, enc.cls.astype(np.int64), np.exp(z - log_z[..., None]), -1)
    return r


def sampler_distribution(tokens: np.ndarray, k: int, tail_model: str, codec: str = "fp16",
                         cls_logits: np.ndarray | None = None, cls_k: int | None = None) -> np.ndarray:
    """q (..., T, C) float64 for teacher token logits (..., T, C) under an encoding, codec and tail model."""
    c = tokens.shape[-1]
    enc = encode_topk(tokens, k)
    z, tail = enc.logit.astype(np.float32), enc.tail_lse.astype(np.float32)
    if codec == "u8":
        z, tail = quantise_u8(z, tail)
    log_z = np.logaddexp(_lse(z), tail)
    top_p = np.exp(z - log_z[..., None]).astype(np.float64)
    tail_mass = np.exp(tail - log_z).astype(np.float64)
    idx = enc.cls.astype(np.int64)
    if tail_model == "uniform":
        r = np.ones(tokens.shape, np.float64)
    elif tail_model == "cls":
        r = np.broadcast_to(cls_weights(cls_logits, cls_k or k)[..., None, :], tokens.shape).astype(np.float64)
    else:
        raise ValueError(f"tail model must be one of {TAIL_MODELS}, got {tail_model!r}")
    r = r.copy()
    np.put_along_axis(r, idx, 0.0, -1)
    r /= np.maximum(r.sum(-1, keepdims=True), 1e-300)
    q = r * tail_mass[..., None] if k < c else np.zeros(tokens.shape)
    np.put_along_axis(q, idx, top_p, -1)
    return q


def total_variation(tokens: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-token TV(softmax(tokens), q), (..., T)."""
    z = tokens.astype(np.float64)
    p = np.exp(z - _lse(z)[..., None])
    return 0.5 * np.abs(p - q).sum(-1)
