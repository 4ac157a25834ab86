"""labeler.render_torch matches the Pillow reference `labelstore.render` (mean |Δ| ≤ 0.01, max 1 level)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from labeler.render_torch import box_reduce, render_views, warp_affine
from labelstore.views import ViewSpec, draw_views, render


@pytest.mark.parametrize("hw,k", [((83, 97), 2), ((100, 100), 3), ((17, 33), 5), ((9, 7), 3), ((300, 290), 17)])
def test_box_reduce_is_pillow_reduce(hw, k):
    src = np.random.default_rng(k).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(src).reduce(k))
    got = box_reduce(torch.from_numpy(src).permute(2, 0, 1), k).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, ref)


def test_warp_matches_pillow_transform():
    rng = np.random.default_rng(1)
    fill, diffs = (124, 116, 104), []
    for t in range(30):
        h, w = rng.integers(10, 90, 2)
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a, s = rng.uniform(-1, 1), rng.uniform(0.5, 2)
        m = np.array([[s * np.cos(a), -s * np.sin(a) + rng.uniform(-.3, .3), rng.uniform(-10, 30)],
                      [s * np.sin(a), s * np.cos(a), rng.uniform(-10, 30)]])
        if t % 3 == 0:  # mirrored integer crop: the case where Pillow's truncation bites
            m = np.array([[-s, 0, w - rng.integers(0, 5)], [0, s, float(rng.integers(0, 5))]])
        ref = np.asarray(Image.fromarray(src).transform((40, 32), Image.Transform.AFFINE, data=tuple(m.ravel()),
                                                         resample=Image.Resampling.BILINEAR, fillcolor=fill))
        got = warp_affine(torch.from_numpy(src).permute(2, 0, 1), m[None], (32, 40), fill)[0].numpy()
        diffs.append(np.abs(got.astype(int) - ref))
    assert max(d.max() for d in diffs) <= 1 and np.mean([d.mean() for d in diffs]) <= 0.01


@pytest.mark.parametrize("size", [(64, 64), (48, 32)])
def test_render_views_matches_reference_render(size):
    spec = ViewSpec(size=size)
    rng = np.random.default_rng(2)
    for row, hw in enumerate([(8, 8), (120, 160), (37, 129), (700, 500)]):
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        params = draw_views(spec, 11, row, 12, hw)
        got = render_views(img, params, spec).numpy()
        ref = np.stack([render(img, p, spec) for p in params])
        assert got.shape == ref.shape == (12, *size, 3) and got.dtype == np.uint8
        d = np.abs(got.astype(int) - ref)
        assert d.max() <= 1 and d.mean() <= 0.01, (hw, d.mean(), d.max())


def test_render_views_geometry_extremes():
    """Strong rotation/shear/translation (fill everywhere outside the crop) and pure flips still match."""
    spec = ViewSpec(size=(40, 40), ra_ops=('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'), ra_num_ops=3, ra_prob=1.0, ra_magnitude=10.0, hflip=1.0)
    img = np.random.default_rng(3).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    params = draw_views(spec, 5, 0, 10, img.shape[:2])
    d = np.abs(render_views(img, params, spec).numpy().astype(int) - np.stack([render(img, p, spec) for p in params]))
    assert d.max() <= 1 and d.mean() <= 0.01


def test_non_bilinear_spec_is_refused():
    spec = ViewSpec(size=(16, 16), interpolation="bicubic")
    img = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="bilinear"):
        render_views(img, draw_views(spec, 0, 0, 1, (20, 20)), spec)
