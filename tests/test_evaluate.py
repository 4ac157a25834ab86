"""Evaluation counting: top-1/top-5 of the class head and token mean, 200-class subsets, IN-C report."""
import pytest
import torch

from trainer.evaluate import (
    AccuracyCounts, EvalReport, corruption_report, count_correct, subset_labels, topk_correct,
)
from trainer.robustness import ALEXNET_MEAN_ERROR, CORRUPTIONS, subset_class_indices


class FixedModel(torch.nn.Module):
    """Returns preset logits whatever the image (the class head) and token logits whose mean differs."""

    def __init__(self, cls_logits, token_logits):
        super().__init__()
        self.cls_logits, self.token_logits = cls_logits, token_logits

    def forward(self, x):
        return self.cls_logits[: len(x)]

    def forward_tokens(self, x):
        return self.cls_logits[: len(x)], self.token_logits[: len(x)]


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    assert topk_correct(logits, torch.tensor([1, 1]), 1) == 1
    assert topk_correct(logits, torch.tensor([1, 1]), 2) == 2
    assert topk_correct(logits, torch.tensor([2, 2]), 5) == 2  # k capped at the class count


def test_class_head_and_token_mean_are_counted_separately():
    cls_logits = torch.eye(6)[[0, 1, 2, 3]] * 5  # predicts 0,1,2,3
    token_logits = torch.eye(6)[[5, 5, 2, 3]][:, None].expand(4, 4, 6) * 5  # token mean predicts 5,5,2,3
    batch = {"image": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 4])}
    c = count_correct(FixedModel(cls_logits, token_logits), [batch], device=torch.device("cpu"),
                      mean=(0.5,) * 3, std=(0.5,) * 3)
    assert (c.n, c.top1, c.token_top1) == (4, 3, 1)
    s = c.summary()
    assert s["top1"] == 0.75 and s["token_top1"] == 0.25 and s["top5"] == 1.0


def test_subset_restricts_logits_before_the_argmax():
    idx = subset_class_indices("imagenet_a")
    outside = next(i for i in range(1000) if i not in set(idx))
    cls_logits = torch.zeros(1, 1000)
    cls_logits[0, outside] = 10.0  # the best class overall is not an ImageNet-A class
    cls_logits[0, idx[7]] = 5.0
    batch = {"image": torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "label": torch.tensor([idx[7]])}
    c = count_correct(FixedModel(cls_logits, cls_logits[:, None]), [batch], device=torch.device("cpu"),
                      mean=(0.5,) * 3, std=(0.5,) * 3, class_subset=idx)
    assert c.top1 == 1 and c.token_top1 == 1


def test_subset_label_mapping_and_errors():
    idx = subset_class_indices("imagenet_r")
    assert subset_labels(torch.tensor([idx[0], idx[199]]), idx, "imagenet", "x").tolist() == [0, 199]
    assert subset_labels(torch.tensor([3]), idx, "subset", "x").tolist() == [3]
    outside = next(i for i in range(1000) if i not in set(idx))
    with pytest.raises(ValueError, match=f"class {outside} is not one of"):
        subset_labels(torch.tensor([outside]), idx, "imagenet", "imagenet-r")
    with pytest.raises(ValueError, match="0..199"):
        subset_labels(torch.tensor([200]), idx, "subset", "imagenet-r")


def test_corruption_report_gives_mce_only_with_all_fifteen():
    partial = corruption_report({"fog": [0.2] * 5, "snow": [0.4] * 5}, clean_error=0.1)
    assert partial["mce"] is None and partial["accuracy"] == pytest.approx(0.7) and "15" in partial["note"]
    full = corruption_report({c: [ALEXNET_MEAN_ERROR[c]] * 5 for c in CORRUPTIONS}, clean_error=0.43478)
    assert full["mce"] == pytest.approx(1.0) and full["relative_mce"] == pytest.approx(1.0)


def test_report_table_and_empty_counts():
    r = EvalReport(checkpoint="c.pth", clean={"top1": 0.5, "top5": 0.9, "token_top1": 0.4})
    assert "clean" in r.table() and "50.00" in r.table()
    with pytest.raises(ValueError, match="no samples"):
        AccuracyCounts().summary()


def test_retention_is_null_when_clean_accuracy_is_zero():
    from trainer.evaluate import _retention

    assert _retention(0.2, 0.0) is None and _retention(0.2, 0.4) == pytest.approx(0.5)
    r = EvalReport(checkpoint="c.pth", clean={"top1": 0.0, "top5": 0.0, "token_top1": 0.0},
                   imagenet_a={"top1": 0.1, "top5": 0.2, "token_top1": 0.1, "retention": None})
    assert "ret n/a" in r.table()


def test_eval_cli_on_imagenet_a_and_r_subsets(tmp_path):
    """A 1000-class checkpoint, IN-A shards labelled with ImageNet ids; IN-R with IN-A's classes is refused."""
    import io
    import json

    import numpy as np
    import webdataset as wds
    from PIL import Image
    from typer.testing import CliRunner

    from labeler.models import create_token_model
    from pipelines.cli_train import app

    model = create_token_model("fan_test_p4_hybrid_token", num_classes=1000)
    torch.save({"arch": "fan_test_p4_hybrid_token", "state_dict": model.state_dict()}, tmp_path / "in1k.pth")
    ina = subset_class_indices("imagenet_a")
    for name, labels in (("clean", list(range(0, 1000, 100))), ("ina", ina[:6])):
        with wds.TarWriter(str(tmp_path / f"{name}.tar")) as w:
            for i, label in enumerate(labels):
                b = io.BytesIO()
                Image.fromarray(np.random.default_rng(i).integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(b, "JPEG")
                w.write({"__key__": f"{name}{i:03d}", "jpg": b.getvalue(), "cls": label})
    common = ["eval", "--checkpoint", str(tmp_path / "in1k.pth"), "--shards", str(tmp_path / "clean.tar"),
              "--set", "model.img_size=64", "--set", "data.workers=0", "--set", "run.amp=none"]
    r = CliRunner().invoke(app, [*common, "--imagenet-a", str(tmp_path / "ina.tar"), "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["clean"]["samples"] == 10 and report["imagenet_a"]["samples"] == 6 and "imagenet-a" in r.output
    r = CliRunner().invoke(app, [*common, "--imagenet-r", str(tmp_path / "ina.tar")])
    assert r.exit_code == 2 and "not one of the subset's 200 classes" in r.output
