"""Top-k codec: exact log-probabilities against a dense softmax; dtypes; rejects bad logits."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import labelstore as L


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("k", [1, 5, 10, 37])
def test_round_trip_matches_dense_softmax(k):
    logits = np.random.default_rng(k).normal(0, 4, (3, 5, 37))
    enc = L.encode_topk(logits, k)
    assert enc.logit.dtype == np.float16 and enc.cls.dtype == np.int16 and enc.k == k
    assert enc.tail_lse.shape == (3, 5)
    ref = log_softmax(logits)
    assert np.array_equal(enc.cls, np.argsort(-logits, -1, kind="stable")[..., :k])
    got = L.topk_log_probs(enc)
    np.testing.assert_allclose(got, np.take_along_axis(ref, enc.cls.astype(int), -1), atol=2e-2)
    # Tail mass = 1 - top-k mass (the tail lse carries exactly what the top-k leaves out).
    tail_p = np.exp(enc.tail_lse.astype(np.float64) - np.logaddexp(
        np.log(np.exp(enc.logit.astype(np.float64)).sum(-1)), enc.tail_lse.astype(np.float64)))
    np.testing.assert_allclose(tail_p + np.exp(got).sum(-1), 1, atol=1e-5)
    if k == 37:
        assert np.all(np.isneginf(enc.tail_lse))


def test_dense_and_sorting_and_ties():
    enc = L.encode_topk(np.array([[1.0, 3.0, 3.0, -2.0]]), 0)
    assert enc.dense and enc.k == 0 and enc.logit.dtype == np.float16 and enc.cls is None
    np.testing.assert_allclose(L.topk_log_probs(enc), log_softmax(np.array([[1.0, 3.0, 3.0, -2.0]])), atol=1e-3)
    enc = L.encode_topk(np.array([1.0, 3.0, 3.0, -2.0]), 3)
    assert enc.cls.tolist() == [1, 2, 0]  # descending, ties by lower class id


def test_class_id_dtype():
    assert L.class_id_dtype(1000) == np.int16 and L.class_id_dtype(32767) == np.int16
    assert L.class_id_dtype(32768) == np.int32
    assert L.encode_topk(np.zeros((2, 40000)), 2).cls.dtype == np.int32


def test_bad_inputs_are_rejected():
    with pytest.raises(L.InvalidLabels, match="NaN/inf"):
        L.encode_topk(np.array([0.0, np.nan]), 1)
    with pytest.raises(L.InvalidLabels, match="k must be"):
        L.encode_topk(np.zeros(4), 5)
    with pytest.raises(L.InvalidLabels, match="float16"):
        L.encode_topk(np.array([1e6, 0.0]), 1)
    with pytest.raises(L.InvalidLabels, match="shape"):
        L.EncodedLogits(np.zeros((2, 3), np.float16), np.zeros((2, 4), np.int16), np.zeros(2, np.float16))


def test_indexing_leading_axes():
    enc = L.encode_topk(np.random.default_rng(0).normal(size=(4, 3, 6, 10)), 2)
    sub = enc[:, 1]
    assert sub.logit.shape == (4, 6, 2) and sub.tail_lse.shape == (4, 6)
    assert np.array_equal(sub.cls, enc.cls[:, 1])
    assert enc[np.array([3, 0])].shape == (2, 3, 6)


@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 60), k=st.integers(0, 60), scale=st.floats(0.1, 20), seed=st.integers(0, 2**31))
def test_log_probs_are_exact_for_any_shape(c, k, scale, seed):
    k = min(k, c)
    logits = np.random.default_rng(seed).normal(0, scale, (2, c))
    enc = L.encode_topk(logits, k)
    lp = L.topk_log_probs(enc)
    ref = log_softmax(logits.astype(np.float16).astype(np.float64))  # what float16 storage allows
    want = ref if k == 0 else np.take_along_axis(ref, enc.cls.astype(int), -1)
    np.testing.assert_allclose(lp, want, atol=2e-2 * max(1.0, scale / 4))
