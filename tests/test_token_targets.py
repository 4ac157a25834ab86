"""Token targets on the device vs the labelstore numpy reference (statistical), modes, smoothing, resampling."""
import numpy as np
import pytest
import torch

from labelstore import encode_topk, sample_token_labels
from trainer.data_config import TokenLabelConfig
from trainer.token_targets import (
    draw_gumbel, resample_grid, smooth, softmax_targets, token_targets, uniform_outside_topk,
)

C, K = 12, 3
# chi-square critical values at p = 0.001 (tables): a correct sampler fails one check 1 time in 1000
# at most, and the seeds are fixed, so the test is deterministic.
CHI2_CRIT_001 = {8: 26.12, 11: 31.26}


def _chi2(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


def _encoded(tokens=1, seed=0):
    """Logits whose tail (9 classes) holds a large share of the mass, so tail draws are common."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 0.7, size=(tokens, C)).astype(np.float32)
    logits[:, [2, 7, 10]] += np.array([1.5, 1.0, 0.5], np.float32)
    return encode_topk(logits, K)


def _t(enc):
    return (torch.from_numpy(enc.logit), torch.from_numpy(enc.cls), torch.from_numpy(enc.tail_lse))


def test_gumbel_matches_numpy_reference_chi_square():
    enc = _encoded()
    n = 40000
    big = type(enc)(np.repeat(enc.logit, n, 0), np.repeat(enc.cls, n, 0), np.repeat(enc.tail_lse, n, 0))
    probs = sample_token_labels(enc, C, "softmax")[0].astype(np.float64)  # the exact encoded distribution
    gen = torch.Generator().manual_seed(1234)
    ours = draw_gumbel(*_t(big), num_classes=C, generator=gen).numpy()
    ref = sample_token_labels(big, C, "gumbel", np.random.default_rng(1234))
    c_ours, c_ref = np.bincount(ours, minlength=C), np.bincount(ref, minlength=C)
    assert c_ours.sum() == n and (c_ours > 0).all()  # every class reachable, tail ones included
    # goodness of fit of each sampler to the exact distribution (df = C - 1), and the two against each other
    for counts in (c_ours, c_ref):
        assert _chi2(counts, n * probs) < CHI2_CRIT_001[C - 1], (counts, n * probs)
    pooled = (c_ours + c_ref) / 2  # two-sample test (equal sizes): ours vs the reference, df = C - 1
    assert _chi2(c_ours, pooled) + _chi2(c_ref, pooled) < CHI2_CRIT_001[C - 1]


def test_tail_draw_is_uniform_outside_topk():
    topk = torch.tensor([[0, 5, 11]]).expand(30000, 3)
    gen = torch.Generator().manual_seed(0)
    out = uniform_outside_topk(topk, C, gen).numpy()
    counts = np.bincount(out, minlength=C)
    assert counts[[0, 5, 11]].sum() == 0
    free = np.delete(counts, [0, 5, 11])
    assert _chi2(free, free.mean()) < CHI2_CRIT_001[len(free) - 1]


def test_softmax_and_argmax_equal_reference():
    enc = _encoded(tokens=50, seed=3)
    ref_soft = sample_token_labels(enc, C, "softmax")
    ours = softmax_targets(*_t(enc), num_classes=C).numpy()
    np.testing.assert_allclose(ours, ref_soft, atol=1e-5)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)
    cfg = TokenLabelConfig(mode="argmax", smoothing=0.0)
    hard = token_targets(*(x[None] for x in _t(enc)), num_classes=C, cfg=cfg, src_grid=(5, 10))[0]
    assert (hard.argmax(-1).numpy() == sample_token_labels(enc, C, "argmax")).all()


def test_dense_store_modes():
    logits = np.random.default_rng(0).normal(size=(1, 4, C)).astype(np.float16)
    z = torch.from_numpy(logits)
    soft = token_targets(z, None, None, num_classes=C, cfg=TokenLabelConfig(mode="softmax", smoothing=0),
                         src_grid=(2, 2))
    np.testing.assert_allclose(soft.numpy(), torch.softmax(z.float(), -1).numpy(), atol=1e-6)
    g = token_targets(z, None, None, num_classes=C, cfg=TokenLabelConfig(smoothing=0), src_grid=(2, 2),
                      generator=torch.Generator().manual_seed(0))
    assert ((g == 0) | (g == 1)).all() and (g.sum(-1) == 1).all()
    with pytest.raises(ValueError, match="classes"):
        token_targets(z, None, None, num_classes=C + 1, cfg=TokenLabelConfig(), src_grid=(2, 2))


def test_gumbel_seeded_and_smoothed():
    enc = _encoded(tokens=16, seed=5)
    args = [x.view(1, 16, -1) if x.dim() == 2 else x.view(1, 16) for x in _t(enc)]
    cfg = TokenLabelConfig(smoothing=0.1)
    a = token_targets(*args, num_classes=C, cfg=cfg, src_grid=(4, 4), generator=torch.Generator().manual_seed(7))
    b = token_targets(*args, num_classes=C, cfg=cfg, src_grid=(4, 4), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (1, 16, C)
    np.testing.assert_allclose(a.sum(-1).numpy(), 1.0, atol=1e-6)
    assert torch.isclose(a.min(), torch.tensor(0.1 / C)) and torch.isclose(a.max(), torch.tensor(0.9 + 0.1 / C))
    assert torch.equal(smooth(a, 0.0), a)


def test_resample_area_when_divisible_else_bilinear():
    x = torch.rand(2, 16, 5)
    x = x / x.sum(-1, keepdim=True)
    pooled = resample_grid(x, (4, 4), (2, 2))
    grid = x.view(2, 4, 4, 5)
    expect = grid.view(2, 2, 2, 2, 2, 5).mean(dim=(2, 4)).reshape(2, 4, 5)
    torch.testing.assert_close(pooled, expect)
    odd = resample_grid(x, (4, 4), (3, 3))
    up = resample_grid(x, (4, 4), (8, 8))
    for out, n in ((odd, 9), (up, 64)):
        assert out.shape == (2, n, 5)
        torch.testing.assert_close(out.sum(-1), torch.ones(2, n))
    assert resample_grid(x, (4, 4), (4, 4)) is x
    with pytest.raises(ValueError, match="stored grid"):
        resample_grid(x, (3, 3), (2, 2))
