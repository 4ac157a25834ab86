"""Token-label fidelity math: the sampler's categorical under each codec / tail model, and its TV to the teacher."""
import numpy as np
import pytest

from labelstore.codec import _lse
from labelstore.label_fidelity import quantise_u8, sampler_distribution, total_variation


def _softmax(z):
    return np.exp(z - _lse(z)[..., None])


@pytest.mark.parametrize("codec", ["fp16", "u8"])
@pytest.mark.parametrize("tail", ["uniform", "cls"])
def test_q_is_a_distribution_that_keeps_the_topk(codec, tail):
    rng = np.random.default_rng(0)
    tok, cls = rng.normal(0, 2, (3, 5, 40)).astype(np.float32), rng.normal(0, 2, (3, 40)).astype(np.float32)
    q = sampler_distribution(tok, 4, tail, codec, cls, 6)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-6)
    top = np.argsort(-tok, -1)[..., :4]
    tol = 0.07 if codec == "u8" else 2e-3  # u8: 1/16-nat steps on each logit and on the tail
    np.testing.assert_allclose(np.take_along_axis(q, top, -1), np.take_along_axis(_softmax(tok), top, -1), rtol=tol, atol=1e-4)


def test_tv_is_zero_exactly_where_the_tail_model_is_right():
    rng = np.random.default_rng(1)
    c, k = 30, 3
    tok = np.full((2, 4, c), -1.0, np.float32)  # flat tail: the uniform model is exact
    tok[..., :k] = rng.normal(3, 1, (2, 4, k))
    assert total_variation(tok, sampler_distribution(tok, k, "uniform")).max() < 2e-3
    cls = rng.normal(0, 1, (2, c)).astype(np.float32)
    shaped = tok.copy()
    shaped[..., k:] = cls[:, None, k:] - 2.0  # token tail shaped like the image-level logits
    assert total_variation(shaped, sampler_distribution(shaped, k, "cls", cls_logits=cls, cls_k=c)).max() < 2e-3
    assert total_variation(shaped, sampler_distribution(shaped, k, "uniform")).mean() > 0.02
    full = sampler_distribution(tok, c, "uniform")  # K = C: nothing in the tail
    assert total_variation(tok, full).max() < 2e-3


def test_u8_keeps_a_tail_heavier_than_the_top1():
    z = np.array([[0.0, -1.0]], np.float32)
    lg, tl = quantise_u8(z, np.array([3.0], np.float32))
    assert lg.tolist() == [[0.0, -1.0]] and tl.tolist() == [3.0]
