"""The built-in demo dataset: determinism, mask semantics, mask/object alignment after a view, corruptions."""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from labelstore.masks import MASK_DISTRACTOR, MASK_OBJECT, decode_mask
from pipelines.demo.corruptions import CORRUPTIONS, corrupt
from pipelines.demo.data import DemoDataSpec, DemoDataset, make_sample, write_demo_data
from pipelines.demo.shapes import CLASS_NAMES, SHAPES

SMALL = DemoDataSpec(seed=3, num_train=12, num_val=6, num_val_corrupt=3, corruptions=("contrast", "pixelate"),
                     severities=(1, 5), samples_per_shard=5)


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 8 neighbours all share their mask value (so bilinear blending cannot reach them)."""
    p = np.pad(mask, 1, mode="edge")
    same = np.ones(mask.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
    return same


def test_samples_are_a_pure_function_of_seed_split_index():
    a, b = make_sample(SMALL, "train", 7), make_sample(SMALL, "train", 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.label == b.label
    assert not np.array_equal(a.image, make_sample(replace(SMALL, seed=4), "train", 7).image)
    assert not np.array_equal(a.image, make_sample(SMALL, "val", 7).image)


def test_shard_size_does_not_change_any_sample(tmp_path):
    write_demo_data(tmp_path / "a", SMALL)
    write_demo_data(tmp_path / "b", replace(SMALL, samples_per_shard=4))
    da, db = DemoDataset.load(tmp_path / "a"), DemoDataset.load(tmp_path / "b")
    for split in ("train", "val"):
        ma = {k: v for p in da.shards(split) for k, v in _members(p).items()}
        mb = {k: v for p in db.shards(split) for k, v in _members(p).items()}
        assert ma == mb and len(ma) == 3 * getattr(SMALL, f"num_{split}")
    assert len(da.shards("train")) == 3 and len(db.shards("train")) == 3


def test_written_shards_hold_jpg_cls_and_a_png_mask(tmp_path):
    manifest = write_demo_data(tmp_path, SMALL)
    ds = DemoDataset.load(tmp_path)
    assert ds.classes == CLASS_NAMES and manifest["splits"]["val"]["num_samples"] == 6
    assert (tmp_path / "classes.txt").read_text().split() == list(CLASS_NAMES)
    members = _members(ds.shards("val")[0])
    for i in range(5):
        key = f"val-{i:06d}"
        img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        mask = decode_mask(members[f"{key}.mask"], key)
        assert img.size == (64, 64) and mask.shape == (64, 64)
        assert int(members[f"{key}.cls"]) == make_sample(SMALL, "val", i).label
        assert np.array_equal(mask, make_sample(SMALL, "val", i).mask)  # PNG is lossless
    assert set(ds.corrupt) == {"contrast", "pixelate"} and set(ds.corrupt["contrast"]) == {1, 5}
    paths, n = ds.corrupt["pixelate"][5]
    corrupted = _members(paths[0])
    assert n == 3 and sorted(corrupted) == sorted(f"val-{i:06d}.{e}" for i in range(3) for e in ("cls", "jpg"))
    with tarfile.open(ds.shards("val")[0]) as tar:  # whole-second times: no pax header before each member
        assert all(m.pax_headers == {} for m in tar.getmembers())
    with pytest.raises(FileExistsError, match="dataset.json"):
        write_demo_data(tmp_path, SMALL)


def test_masks_mark_the_class_object_and_distractors():
    spec = replace(SMALL, max_distractors=2)
    n_distractor_images = 0
    for i in range(30):
        s = make_sample(spec, "train", i)
        assert set(np.unique(s.mask)) <= {0, MASK_OBJECT, MASK_DISTRACTOR}
        assert s.objects[-1].cls == s.label == i % 10
        assert all(o.cls != s.label for o in s.objects[:-1])
        area = (s.mask == MASK_OBJECT).mean()
        lo, hi = spec.object_scale
        assert 0.25 * lo ** 2 < area < hi ** 2 * 1.2, (i, area)  # shapes fill 35-110 % of their box
        n_distractor_images += bool((s.mask == MASK_DISTRACTOR).any())
    assert n_distractor_images >= 10


def test_every_shape_is_negative_inside_and_positive_far_away():
    u, v = np.meshgrid(np.linspace(-1.5, 1.5, 61), np.linspace(-1.5, 1.5, 61))
    areas = []
    for name, fn in SHAPES.items():
        d = fn(u, v)
        assert d.shape == u.shape and (d[np.hypot(u, v) > 1.2] > 0).all(), name
        areas.append(round(float((d < 0).mean()), 3))
    assert len(set(areas)) == len(areas)  # ten different silhouettes


def _flat(spec):
    return replace(spec, textures=("flat",), max_distractors=0)


def test_mask_is_aligned_with_the_object_pixels():
    s = make_sample(_flat(SMALL), "train", 4)
    inner = _eroded(s.mask) & (s.mask == MASK_OBJECT)
    diff = np.abs(s.image[inner].astype(int) - np.array(s.objects[-1].color1)).max(axis=1)
    assert inner.sum() > 20 and diff.max() <= 1


def _object_colour_agreement(image, inner, color) -> float:
    return float((np.abs(image[inner].astype(int) - np.array(color)).max(axis=1) <= 3).mean())


def test_mask_rendered_with_the_view_params_stays_on_the_object():
    from labelstore import ViewSpec, draw_view_params, render, render_mask

    spec = ViewSpec(size=(48, 48))
    agreements, shifted = [], []
    for i in range(10):
        s = make_sample(_flat(replace(SMALL, object_scale=(0.4, 0.6))), "train", i)
        # Object pixels 2+ px inside the outline: fully covered, and so are their neighbours, so a bilinear
        # sample at them is pure object colour.
        inside = (_eroded(s.mask) & (s.mask == MASK_OBJECT)).astype(np.uint8)
        core = (_eroded(inside) & (inside == 1)).astype(np.uint8)
        for view in range(3):
            params = draw_view_params(spec, 11, i, view, s.image.shape[:2])
            img, mask = render(s.image, params, spec), render_mask(s.mask, params, spec)
            assert img.shape == (48, 48, 3) and mask.shape == (48, 48) and mask.dtype == s.mask.dtype
            inner = render_mask(core, params, spec) == 1
            assert (mask[inner] == MASK_OBJECT).all()
            if inner.sum() < 10:
                continue  # object cropped out of this view
            agreements.append(_object_colour_agreement(img, inner, s.objects[-1].color1))
            shifted.append(_object_colour_agreement(img, np.roll(inner, 4, axis=1), s.objects[-1].color1))
    assert len(agreements) >= 10
    assert min(agreements) > 0.99, agreements
    assert np.mean(shifted) < np.mean(agreements) - 0.1  # the check notices a misaligned mask


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_keep_shape_and_grow_with_severity(name):
    img = make_sample(SMALL, "val", 1).image
    outs = [corrupt(img, name, sev, np.random.default_rng(0)) for sev in (1, 5)]
    diffs = [np.abs(o.astype(int) - img).mean() for o in outs]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert 0 < diffs[0] < diffs[1], diffs


def test_bad_settings_are_rejected_with_their_name():
    with pytest.raises(ValueError, match="image_size"):
        DemoDataSpec(image_size=8)
    with pytest.raises(ValueError, match="num_val_corrupt"):
        DemoDataSpec(num_val=3, num_val_corrupt=5)
    with pytest.raises(ValueError, match="corruptions"):
        DemoDataSpec(corruptions=("snowstorm",))
    with pytest.raises(ValueError, match="textures"):
        DemoDataSpec(textures=("plaid",))
    with pytest.raises(ValueError, match="colors"):
        DemoDataSpec(colors="rainbow")
    with pytest.raises(ValueError, match="severity"):
        corrupt(np.zeros((8, 8, 3), np.uint8), "contrast", 6, np.random.default_rng(0))


def test_spec_round_trips_through_the_manifest(tmp_path):
    write_demo_data(tmp_path, SMALL)
    assert DemoDataset.load(tmp_path).spec == SMALL
    assert json.loads((tmp_path / "dataset.json").read_text())["format"] == "stl-demo-data"
    with pytest.raises(FileNotFoundError, match="demo-data"):
        DemoDataset.load(tmp_path / "missing")


def test_cli_writes_the_dataset(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli_labels import app

    r = CliRunner().invoke(app, ["demo-data", str(tmp_path / "d"), "--train", "4", "--val", "2",
                                 "--val-corrupt", "1", "--corruptions", "contrast", "--per-shard", "3"])
    assert r.exit_code == 0, r.output
    ds = DemoDataset.load(tmp_path / "d")
    assert ds.splits["train"][1] == 4 and len(ds.shards("train")) == 2 and list(ds.corrupt) == ["contrast"]
    bad = CliRunner().invoke(app, ["demo-data", str(tmp_path / "e"), "--size", "8"])
    assert bad.exit_code != 0 and "image_size" in bad.output


def test_pattern_expands_to_the_shard_list(tmp_path):
    from labelstore.shard_format import expand_shard_urls

    write_demo_data(tmp_path, SMALL)
    ds = DemoDataset.load(tmp_path)
    assert ds.pattern("train").endswith("train-{000000..000002}.tar")
    assert expand_shard_urls(ds.pattern("train")) == ds.shards("train")
    assert ds.pattern("val").endswith("val-{000000..000001}.tar")
    write_demo_data(tmp_path / "one", replace(SMALL, num_train=3))
    one = DemoDataset.load(tmp_path / "one")
    assert one.pattern("train") == one.shards("train")[0]


def test_class_colours_put_each_class_in_its_own_hue_band():
    import colorsys

    spec = replace(SMALL, colors="class", textures=("flat",), max_distractors=0)
    for i in range(20):
        obj = make_sample(spec, "train", i).objects[-1]
        hue = colorsys.rgb_to_hsv(*(c / 255 for c in obj.color1))[0]
        gap = abs((hue - obj.cls / 10 + 0.5) % 1.0 - 0.5)
        assert gap < 0.045, (i, obj.cls, hue)
