"""Reference sampler: draw frequencies vs the exact encoded categorical (chi-square, fixed seed)."""
from __future__ import annotations

import numpy as np
import pytest

import labelstore as L

# chi-square 0.999 quantiles (scipy.stats.chi2.ppf(0.999, df)) for the degrees of freedom used below
CHI2_999 = {9: 27.877, 11: 31.264}


def encoded_categorical(enc: L.EncodedLogits, num_classes: int) -> np.ndarray:
    """Exact class probabilities the encoding defines (top-k exact; tail mass uniform over the rest),
    computed independently of the sampler."""
    if enc.dense:
        z = enc.logit.astype(np.float64)
        return np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    probs = np.full(num_classes, 0.0)
    top = np.exp(L.topk_log_probs(enc).astype(np.float64))
    probs[:] = (1 - top.sum()) / (num_classes - enc.k)
    probs[enc.cls.astype(int)] = top
    return probs


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("k", [3, 0])
def test_gumbel_draws_follow_the_categorical(k):
    c = 12
    logits = np.array([2.0, 1.5, 1.4, 0.3, -0.2, 0.1, 0.0, -1.0, 0.5, -0.5, 0.2, -0.3])
    enc = L.encode_topk(logits, k)
    probs = encoded_categorical(enc, c)
    np.testing.assert_allclose(probs.sum(), 1, atol=1e-6)
    n = 60_000
    tiled = L.EncodedLogits(np.broadcast_to(enc.logit, (n,) + enc.logit.shape),
                            None if enc.dense else np.broadcast_to(enc.cls, (n, k)),
                            None if enc.dense else np.broadcast_to(enc.tail_lse, (n,)))
    draws = L.sample_token_labels(tiled, c, "gumbel", np.random.default_rng(1234))
    counts = np.bincount(draws, minlength=c)
    assert chi_square(counts, probs) < CHI2_999[c - 1]
    if k:
        # Tail draws land on every class outside the top-k, never on a top-k class via the tail.
        assert (counts[np.setdiff1d(np.arange(c), enc.cls)] > 0).all()
        # A sampler ignoring the tail (renormalised top-k) fails the same test.
        wrong = np.zeros(c)
        wrong[enc.cls] = np.exp(L.topk_log_probs(enc))
        wrong[enc.cls] += (1 - wrong.sum()) / k
        with np.errstate(divide="ignore"):
            assert chi_square(counts, np.maximum(wrong, 1e-12)) > CHI2_999[c - 1]


def test_tail_maps_uniformly_outside_topk():
    # Top-k holds almost nothing: nearly every draw is a tail draw, uniform over the 8 other classes.
    enc = L.EncodedLogits(np.full((40_000, 4), -20, np.float16), np.tile(np.array([0, 3, 7, 9], np.int16), (40_000, 1)),
                          np.zeros(40_000, np.float16))
    draws = L.sample_token_labels(enc, 12, "gumbel", np.random.default_rng(7))
    counts = np.bincount(draws, minlength=12)
    assert counts[[0, 3, 7, 9]].sum() < 10
    others = np.setdiff1d(np.arange(12), [0, 3, 7, 9])
    assert chi_square(counts[others], np.full(8, 1 / 8)) < 24.322  # chi2.ppf(0.999, 7)


def test_softmax_and_argmax_modes():
    logits = np.random.default_rng(0).normal(0, 2, (5, 7, 30))
    enc = L.encode_topk(logits, 30)
    p = L.sample_token_labels(enc, 30, "softmax")
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(p, ref / ref.sum(-1, keepdims=True), atol=5e-3)
    assert np.array_equal(L.sample_token_labels(L.encode_topk(logits, 4), 30, "argmax"), logits.argmax(-1))
    assert np.array_equal(L.sample_token_labels(L.encode_topk(logits, 0), 30, "argmax"), logits.argmax(-1))
    with pytest.raises(L.InvalidLabels, match="mode"):
        L.sample_token_labels(enc, 30, "temperature")


def test_same_seed_same_draws():
    enc = L.encode_topk(np.random.default_rng(0).normal(size=(100, 50)), 5)
    a = L.sample_token_labels(enc, 50, "gumbel", np.random.default_rng(3))
    assert np.array_equal(a, L.sample_token_labels(enc, 50, "gumbel", np.random.default_rng(3)))
