"""Rendering from the footprint region a worker sends (`source_footprint` + origins) is bit-identical to
rendering from the whole image: the geometry stays the whole image's, only the pixel offsets move."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import labeler.render_batch as rb
from labeler.flat_images import pack_flat, upload_flat
from labeler.render_batch import SourceBatch, render_batch, source_footprint
from labelstore.views import NUM_PARAMS, PARAM_FIELDS, ViewSpec, ViewSpecError, crop_boxes, draw_views, view_geometry

SIZES = [(8, 8), (120, 160), (37, 129), (700, 500), (300, 290), (451, 470), (640, 427), (64, 640)]
SPECS = {
    "default": ViewSpec(size=(64, 64)),
    "non-square": ViewSpec(size=(48, 32)),
    "every geometric op, flips": ViewSpec(size=(40, 40), ra_ops=('Rotate', 'ShearX', 'ShearY', 'TranslateXRel',
                                                                 'TranslateYRel'), ra_num_ops=3, ra_prob=1.0,
                                          ra_magnitude=10.0, hflip=1.0),
    "large crops (box reduction)": ViewSpec(size=(32, 32), scale=(0.5, 1.0)),
    "small crops": ViewSpec(size=(24, 24), scale=(0.02, 0.1)),
}
CROP = [PARAM_FIELDS.index(f) for f in ("crop_x", "crop_y", "crop_w", "crop_h")]


def _images(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in SIZES]


def _views(spec: ViewSpec, images, per_image: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random views, plus views whose crops touch each edge of their image (and the whole image)."""
    rng = np.random.default_rng(seed)
    index, params = [], []
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        drawn = draw_views(spec, seed, i, per_image + 5, (h, w))
        for j, p in enumerate(drawn):
            p = p.copy()
            cw, ch = int(p[CROP[2]]), int(p[CROP[3]])
            edge = j - per_image  # 0: top-left, 1: bottom-right, 2: top-right, 3: bottom-left, 4: whole image
            if edge in (0, 1, 2, 3):
                p[CROP[0]] = 0 if edge in (0, 3) else w - cw
                p[CROP[1]] = 0 if edge in (0, 2) else h - ch
            elif edge == 4:
                p[CROP] = (0, 0, w, h)
                p[PARAM_FIELDS.index("flip")] = float(rng.random() < 0.5)
            index.append(i)
            params.append(p)
    return np.array(index), np.stack(params).astype(np.float32)


def _regions(images, index, params, spec):
    """One region per view: its footprint cut out of its image, as a worker sends it."""
    foot = source_footprint(params, np.array([images[i].shape[:2] for i in index]))
    crops = [images[i][y0:y1, x0:x1] for i, (y0, x0, y1, x1) in zip(index, foot)]
    return crops, foot


@pytest.mark.parametrize("name", list(SPECS))
def test_footprint_regions_render_bit_identical_to_whole_images(name):
    spec = SPECS[name]
    images = _images(3)
    index, params = _views(spec, images, per_image=12, seed=7)
    whole = render_batch(upload_flat(pack_flat(images), "cpu"), index, params, spec)
    crops, foot = _regions(images, index, params, spec)
    hw = np.array([images[i].shape[:2] for i in index])
    sources = upload_flat(pack_flat(crops), "cpu", image_hw=hw, origins=foot[:, :2])
    got = render_batch(sources, np.arange(len(index)), params, spec)  # one view per region: the grouped path
    assert torch.equal(got, whole), (name, int((got != whole).sum()))
    if name == "large crops (box reduction)":
        assert (view_geometry(params, hw, spec).factors >= 2).sum() >= 10  # the k >= 2 path was covered


def test_shared_region_with_uneven_views_per_image_is_bit_identical():
    """Several views of one image from one region (their footprints' union), uneven counts: the ungrouped path."""
    spec = SPECS["default"]
    images = _images(4)
    index, params = _views(spec, images, per_image=3, seed=9)
    keep = np.flatnonzero(index != 2)[:-3]  # image 2 has none, the last image fewer: not grouped
    index, params = index[keep], params[keep]
    whole = render_batch(upload_flat(pack_flat(images), "cpu"), index, params, spec)
    foot = source_footprint(params, np.array([images[i].shape[:2] for i in index]))
    used = np.unique(index)
    union = np.array([np.r_[foot[index == i, :2].min(0), foot[index == i, 2:].max(0)] for i in used])
    crops = [images[i][y0:y1, x0:x1] for i, (y0, x0, y1, x1) in zip(used, union)]
    sources = upload_flat(pack_flat(crops), "cpu", image_hw=np.array([images[i].shape[:2] for i in used]),
                          origins=union[:, :2])
    got = render_batch(sources, np.searchsorted(used, index), params, spec)
    assert torch.equal(got, whole)


def test_float32_regions_stay_within_the_render_bound(monkeypatch):
    """The GPU's float32 arithmetic: regions vs whole images within the bound the renderer keeps to Pillow."""
    monkeypatch.setattr(rb, "_float_dtype", lambda device: torch.float32)
    spec = SPECS["every geometric op, flips"]
    images = _images(5)
    index, params = _views(spec, images, per_image=8, seed=11)
    whole = render_batch(upload_flat(pack_flat(images), "cpu"), index, params, spec)
    crops, foot = _regions(images, index, params, spec)
    got = render_batch(upload_flat(pack_flat(crops), "cpu", image_hw=np.array([images[i].shape[:2] for i in index]),
                                   origins=foot[:, :2]), np.arange(len(index)), params, spec)
    d = (got.int() - whole.int()).abs()
    assert d.max() <= 1 and d.float().mean() <= 0.01


@pytest.mark.parametrize("name", list(SPECS))
def test_crop_boxes_are_the_view_geometry_boxes_and_refuse_what_it_refuses(name):
    """A worker's footprint comes from `crop_boxes` alone (no matrices): the same boxes as the full geometry."""
    spec = SPECS[name]
    images = _images(5)
    index, params = _views(spec, images, 4, seed=9)
    hw = np.array([images[i].shape[:2] for i in index])
    assert np.array_equal(crop_boxes(params, hw), view_geometry(params, hw, spec).boxes)
    outside = params[:1].copy()
    outside[0, CROP[0]] = hw[0, 1]  # starts at the right edge: an empty crop inside the image
    with pytest.raises(ViewSpecError, match=r"does not fit in the source image") as got:
        crop_boxes(outside, hw[:1])
    with pytest.raises(ViewSpecError, match=re.escape(str(got.value))):
        view_geometry(outside, hw[:1], spec)
    with pytest.raises(ViewSpecError, match="NaN/inf"):
        crop_boxes(np.full((1, NUM_PARAMS), np.nan, np.float32), (10, 10))


def test_footprint_is_the_crop_box_plus_margin_clipped():
    p = np.zeros((2, NUM_PARAMS), np.float32)
    p[0, CROP] = (0, 0, 10, 12)  # touches the top-left corner
    p[1, CROP] = (5, 3, 15, 17)  # touches the bottom-right corner of a 20 × 20 image
    foot = source_footprint(p, (20, 20))
    assert foot.tolist() == [[0, 0, 13, 11], [2, 4, 20, 20]]


def test_a_region_missing_part_of_the_footprint_is_refused():
    spec = ViewSpec(size=(16, 16))
    img = _images(6)[1]
    params = draw_views(spec, 0, 0, 1, img.shape[:2])
    y0, x0, y1, x1 = source_footprint(params, img.shape[:2])[0]
    short = img[y0:y1 - 1, x0:x1]
    src = upload_flat(pack_flat([short]), "cpu", image_hw=np.array([img.shape[:2]]), origins=np.array([[y0, x0]]))
    with pytest.raises(ValueError, match="holds only"):
        render_batch(src, [0], params, spec)
    with pytest.raises(ValueError, match="inside their images"):
        SourceBatch(src.pixels, np.array([img.shape[:2]]), origins=np.array([[img.shape[0], 0]]))
    with pytest.raises(ValueError, match="image_hw"):
        upload_flat(pack_flat([short]), "cpu", origins=np.array([[y0, x0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_regions_within_the_render_bound_of_whole_images():
    """On the GPU (float32): footprint regions uploaded from page-locked memory vs the CPU's exact whole-image
    render, within the renderer's bound; printed for the record."""
    spec = SPECS["every geometric op, flips"]
    images = _images(8)
    index, params = _views(spec, images, per_image=8, seed=13)
    whole = render_batch(upload_flat(pack_flat(images), "cpu"), index, params, spec)
    crops, foot = _regions(images, index, params, spec)
    flat = pack_flat(crops, pin_memory=True)
    got = render_batch(upload_flat(flat, "cuda", image_hw=np.array([images[i].shape[:2] for i in index]),
                                   origins=foot[:, :2]), np.arange(len(index)), params, spec).cpu()
    d = (got.int() - whole.int()).abs()
    print(f"cuda footprint render vs CPU whole-image render: mean |Δ| {d.float().mean():.4f}, max {int(d.max())}")
    assert d.max() <= 1 and d.float().mean() <= 0.01
