"""`stl-labels report`: the statistics as pure functions, and a report built on a tiny store."""
from __future__ import annotations

import json
from html import escape
from dataclasses import replace

import numpy as np
import pytest

from labelstore import EncodedLogits, encode_topk
from pipelines.report.numbers import TokenArrays, quality_numbers
from pipelines.report.stats import (
    argmax_labels, change_rate, class_prob, confidence, foreground_scores, histogram, pool_mask_to_grid,
    tail_mass, token_dist,
)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- pure statistics -------------------------------------------------------------------------------

def test_topk_distribution_matches_the_dense_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 5, 12)).astype(np.float32)
    p = _softmax(logits.astype(np.float64))
    d = token_dist(encode_topk(logits, 4), 12)
    dense = token_dist(EncodedLogits(logits), 12)
    np.testing.assert_allclose(confidence(d), p.max(-1), rtol=2e-3)
    np.testing.assert_allclose(confidence(dense), p.max(-1), rtol=1e-5)
    assert np.array_equal(argmax_labels(d), p.argmax(-1)) and np.array_equal(argmax_labels(dense), p.argmax(-1))
    top4 = np.sort(p, -1)[..., -4:].sum(-1)
    np.testing.assert_allclose(tail_mass(d), 1 - top4, atol=2e-3)
    assert np.all(tail_mass(dense) == 0)
    # P(label): exact inside the top-k, the tail spread evenly over the 8 missing classes outside it.
    labels = np.array([0, 5, 11])
    got = class_prob(d, labels)
    want = p[np.arange(3), :, labels]
    in_topk = (d.classes == labels[:, None, None]).any(-1)
    np.testing.assert_allclose(got[in_topk], want[in_topk], rtol=2e-3)
    np.testing.assert_allclose(got[~in_topk], (1 - top4)[~in_topk] / 8, rtol=2e-3)
    np.testing.assert_allclose(class_prob(dense, labels), want, rtol=1e-5)


def test_pool_mask_to_grid_is_area_pooling():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :2] = 1
    mask[6:, 6:] = 2
    g = pool_mask_to_grid(mask, (2, 2), 1)
    np.testing.assert_allclose(g, [[0.5, 0], [0, 0]])
    np.testing.assert_allclose(pool_mask_to_grid(mask, (4, 4), 2), np.pad([[1.0]], ((3, 0), (3, 0))))
    odd = np.random.default_rng(1).integers(0, 2, (10, 7)).astype(np.uint8)
    share = pool_mask_to_grid(odd, (3, 3), 1)  # uneven token boxes: rows 3/3/4, cols 2/2/3
    areas = np.outer([3, 3, 4], [2, 2, 3])
    assert share.shape == (3, 3) and (share * areas).sum() == odd.sum()
    batch = pool_mask_to_grid(np.stack([odd, 1 - odd]), (3, 3), 1)
    np.testing.assert_allclose(batch[0] + batch[1], 1.0)
    with pytest.raises(ValueError, match="finer"):
        pool_mask_to_grid(odd, (11, 2))


def test_foreground_scores_count_every_token():
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    truth = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], bool)
    s = foreground_scores(pred, truth)  # tp 2, fp 1, fn 1, tn 4
    assert s == {"accuracy": 6 / 8, "iou": 2 / 4, "precision": 2 / 3, "recall": 2 / 3, "tokens": 8}
    assert np.isnan(foreground_scores(np.zeros(3, bool), np.zeros(3, bool))["iou"])


def test_histogram_and_change_rate():
    h = histogram(np.array([0.0, 0.05, 0.5, 0.99, 1.0]), bins=4)
    assert h["counts"] == [2, 0, 1, 2] and abs(sum(h["fractions"]) - 1) < 1e-12 and len(h["edges"]) == 5
    assert change_rate(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5


def _arrays(n=6, s=2, t=16, seed=0, share=True):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    obj = rng.random((n, s, t)) < 0.4
    argmax = np.where(obj, labels[:, None, None], 3)
    conf = np.where(obj, 0.9, 0.4)
    return TokenArrays(confidence=conf, argmax=argmax, p_label=np.where(obj, 0.9, 0.05), tail=np.full((n, s, t), 0.01),
                       gumbel=argmax, cls_argmax=np.repeat(labels[:, None], s, 1), labels=labels,
                       object_share=np.where(obj, 0.8, 0.1) if share else None)


def test_quality_numbers_of_a_perfect_labeler():
    a = _arrays()
    q = quality_numbers(a)
    for rule in ("argmax", "softmax_threshold", "gumbel"):
        assert q["masks"][rule]["iou"] == 1.0 and q["masks"][rule]["accuracy"] == 1.0
    assert q["gumbel_changes_argmax"] == 0.0 and q["class_head_top1_is_image_class"] == 1.0
    assert q["confidence_hist"]["foreground_mean"] == pytest.approx(0.9)
    assert q["confidence_hist"]["background_mean"] == pytest.approx(0.4)
    assert q["top1_is_image_class"] == pytest.approx(q["masks"]["object_token_share"])


def test_quality_numbers_notice_wrong_labels_and_unknown_classes():
    a = _arrays()
    shuffled = replace(a, argmax=np.roll(a.argmax, 1, axis=2), gumbel=np.full_like(a.gumbel, 3))
    q = quality_numbers(shuffled)
    assert q["masks"]["argmax"]["iou"] < 0.5 and q["masks"]["gumbel"]["iou"] == 0.0
    assert q["gumbel_changes_argmax"] > 0.3
    unknown = replace(a, labels=np.array([-1, 1, 2, 0, 1, 2]))
    assert quality_numbers(unknown)["images_with_class"] == 5
    no_masks = quality_numbers(replace(a, object_share=None))
    assert "masks" not in no_masks and no_masks["confidence_hist"]["split_by"] == "token top-1 == image class"
    with pytest.raises(ValueError, match="gumbel"):
        replace(a, gumbel=a.gumbel[:, :1])


# --- a report on a tiny store ----------------------------------------------------------------------

def _oracle_store(tmp_path):
    """Demo shards + a store whose 'oracle' labeler marks exactly the object tokens of every view."""
    import webdataset as wds

    from labelstore import LabelStore, LabelerSpec, ViewSpec, decode_image, draw_views, render_mask
    from labelstore.masks import decode_mask
    from pipelines.demo.data import DemoDataSpec, DemoDataset, write_demo_data

    write_demo_data(tmp_path / "data", DemoDataSpec(seed=1, num_train=10, num_val=0, num_val_corrupt=0,
                                                    corruptions=(), samples_per_shard=4, object_scale=(0.4, 0.6)))
    urls = DemoDataset.load(tmp_path / "data").shards("train")
    store = LabelStore.create(str(tmp_path / "labels.zarr"), seed=5, rows_per_chunk=8)
    shards = store.register_shards([(u, n) for u, n in zip(urls, (4, 4, 2))])
    vs = ViewSpec(size=(32, 32), scale=(0.5, 1.0))
    spec = LabelerSpec(name="oracle", arch="oracle", num_classes=10, input_size=(32, 32), grid=(4, 4),
                       mean=(0.5,) * 3, std=(0.5,) * 3, view_spec=vs, views=2, topk=3)
    lab = store.add_labeler(spec)
    rng = np.random.default_rng(0)
    for info in shards:
        samples = list(wds.WebDataset(info.url, shardshuffle=False, empty_check=False))
        n = len(samples)
        keys, labels = [s["__key__"] for s in samples], [int(s["cls"]) for s in samples]
        hw = [decode_image(s["jpg"]).size[::-1] for s in samples]
        params = np.stack([draw_views(vs, store.seed, info.first_row + i, 2, hw[i]) for i in range(n)])
        logits = rng.normal(0, 0.3, (n, 2, 16, 10))
        for i, s in enumerate(samples):
            mask = decode_mask(s["mask"])
            for v in range(2):
                fg = pool_mask_to_grid(render_mask(mask, params[i, v], vs), (4, 4), 1).ravel() >= 0.5
                logits[i, v, fg, labels[i]] += 4.0
                logits[i, v, ~fg, (labels[i] + 1) % 10] += 2.5
        cls = np.zeros((n, 2, 10))
        cls[np.arange(n), :, labels] = 5.0
        lab.write_shard(info.index, keys=keys, labels=labels, image_hw=hw, valid=[True] * n, params=params,
                        tokens=encode_topk(logits.astype(np.float32), 3), cls=encode_topk(cls.astype(np.float32), 3))
    return str(tmp_path / "labels.zarr"), urls, str(tmp_path / "data" / "classes.txt")


def test_report_on_a_tiny_store_writes_pictures_and_sane_numbers(tmp_path):
    from PIL import Image

    from pipelines.report import ReportConfig, build_report

    store, urls, classes = _oracle_store(tmp_path)
    out = tmp_path / "report"
    r = build_report(ReportConfig(store=store, labeler="oracle", out=str(out), masks=tuple(urls), samples=3,
                                  classes_file=classes))
    assert (r["images"], r["views"], r["tokens_per_view"]) == (10, 2, 16)
    m = r["masks"]
    assert m["argmax"]["iou"] == 1.0 and m["argmax"]["accuracy"] == 1.0  # the oracle marks exactly the object
    assert 0.03 < m["object_token_share"] < 0.9
    assert r["top1_is_image_class"] == pytest.approx(m["object_token_share"])
    assert 0.0 < r["gumbel_changes_argmax"] < 0.5 and m["gumbel"]["iou"] < 1.0
    assert r["class_head_top1_is_image_class"] == 1.0
    assert r["confidence_hist"]["split_by"] == "ground-truth mask"
    assert r["confidence_hist"]["foreground_mean"] > r["confidence_hist"]["background_mean"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["masks"]["argmax"]["iou"] == 1.0 and len(saved["samples"]) == 3
    html = (out / "index.html").read_text()
    for f in ["confidence_hist.png", "tail_mass_hist.png"]:
        assert f in html and Image.open(out / f).size[0] > 300
    for s in saved["samples"]:
        assert [p["kind"] for p in s["panels"]] == ["view", "argmax", "confidence", "foreground", "gumbel",
                                                     "object_share", "object_mask"]
        for p in s["panels"]:
            assert p["file"] in html and escape(p["caption"]) in html and Image.open(out / p["file"]).size[0] >= 160
        argmax, gumbel = s["panels"][1], s["panels"][4]
        assert argmax["legend"] and gumbel["legend"]
        assert sum(e["share"] for e in argmax["legend"]) == pytest.approx(1.0)  # its own classes, all of them
    assert "teacher weights:\nrandom weights (no checkpoint)" in html and "class='warning'" in html  # no checkpoint
    assert {s["class"] for s in saved["samples"]} <= set(open(classes).read().split())  # names from --classes


def test_report_cli_and_its_errors(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli_labels import app

    store, urls, _ = _oracle_store(tmp_path)
    r = CliRunner().invoke(app, ["report", store, "--labeler", "oracle", "--out", str(tmp_path / "rep"),
                                 "--samples", "1", "--masks", urls[0], "--masks", urls[1], "--masks", urls[2]])
    assert r.exit_code == 0, r.output
    assert "foreground IoU (argmax): 1.000" in r.output and (tmp_path / "rep" / "sample_000_view.png").exists()
    bad = CliRunner().invoke(app, ["report", store, "--labeler", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "nope" in bad.output
    partial = CliRunner().invoke(app, ["report", store, "--labeler", "oracle", "--out", str(tmp_path / "y"),
                                       "--masks", urls[0]])
    assert partial.exit_code == 2 and "mask" in partial.output


def _report_dict(images_with_class: int, samples: list | None = None) -> dict:
    nan = float("nan")
    hist = {"edges": [0, 0.5, 1], "counts": [0, 0], "fractions": [0.0, 0.0]}
    return {"labeler": "t", "store": "s.zarr", "images": 2, "views": 1, "tokens_per_view": 4,
            "images_with_class": images_with_class,
            "labeler_spec": {"arch": "a", "num_classes": 3, "grid": [2, 2], "input_size": [8, 8], "views": 1, "topk": 2,
                             "checkpoint_sha256": "ab" * 32},
            "top1_is_image_class": nan if not images_with_class else 0.5,
            "class_head_top1_is_image_class": nan if not images_with_class else 1.0,
            "confidence": {"mean": 0.7}, "p_image_class": {"n": 0} if not images_with_class else {"mean": 0.4},
            "confidence_hist": {"split_by": "token top-1 == image class", "foreground": hist, "background": hist,
                                "foreground_mean": nan, "background_mean": nan},
            "tail_mass": {"mean": 0.1, "p90": 0.2, "histogram": {**hist, "counts": [4, 0], "fractions": [1.0, 0.0]}},
            "gumbel_changes_argmax": 0.25, "charts": [], "samples": samples or []}


def test_page_without_image_classes_has_no_na_rows_and_says_why_a_figure_is_missing(tmp_path):
    from pipelines.report.build import draw_charts
    from pipelines.report.page import write_index

    r = _report_dict(0)
    r["charts"] = draw_charts(r, tmp_path)
    assert r["charts"][0]["file"] is None and not (tmp_path / "confidence_hist.png").exists()  # empty: not drawn
    assert (tmp_path / "tail_mass_hist.png").exists()
    write_index(tmp_path / "index.html", r)
    page = (tmp_path / "index.html").read_text()
    assert "n/a" not in page and "None of these images has a class label" in page
    assert "No confidence histogram: none of these images has a class label" in page
    assert page.count("<tr>") == 4  # images, mean confidence, tail mass, Gumbel
    assert "checkpoint sha256 abababababab" in page and "class='warning'" not in page
    assert "<ul class='legend'><li><span class='swatch' style='background:#787878'></span>all tokens" in page


def test_sample_legends_are_per_panel_and_colours_are_distinct():
    from pipelines.report import pictures
    from pipelines.report.build import _class_legend

    from skimage.color import rgb2lab

    lab = rgb2lab(np.array(pictures.PALETTE, float)[None] / 255)[0]
    gaps = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(len(lab)) * 1e3
    assert gaps.min() >= 25  # no two near-identical colours (CIELAB distance)
    assert np.linalg.norm(rgb2lab(np.array([[pictures.OTHER]], float) / 255)[0, 0] - lab, axis=-1).min() >= 25
    names = [f"c{i}" for i in range(30)]
    am = np.array([[0, 0], [1, 2]])
    gb = np.array([[0, 5], [5, 5]])
    colours = pictures.class_colours([5, 0, 1, 2], 30)
    assert [e["name"] for e in _class_legend(am, colours, names, 0, "image class")] == \
        ["c0 (image class)", "c1", "c2"]  # the argmax panel's classes only
    assert [e["name"] for e in _class_legend(gb, colours, names, 0, "image class")] == ["c5", "c0 (image class)"]
    many = np.arange(25).reshape(5, 5)
    legend = _class_legend(many, pictures.class_colours(list(range(25)), 30), names, -1, "class head")
    assert len(legend) == len(pictures.PALETTE) + 1 and legend[-1]["name"] == f"{25 - len(pictures.PALETTE)} other classes"
    assert len({e["colour"] for e in legend[:-1]}) == len(pictures.PALETTE)


def test_bar_chart_draws_tiny_and_empty_series():
    from pipelines.report.charts import bar_chart

    edges = [i / 40 for i in range(41)]
    img = bar_chart(edges, [("a", [1e-9] * 40, (255, 0, 0)), ("b", [0.0] * 40, (0, 0, 255))], "t", "x")
    assert img.size == (560, 320)
    assert bar_chart([0, 1], [("empty", [], (0, 0, 0))], "t", "x").size == (560, 320)
