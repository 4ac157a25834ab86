"""The numbers of a token-label report, from per-token arrays (pure: no store, no files)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.report.stats import change_rate, foreground_scores, histogram, summary

FOREGROUND_SHARE = 0.5  # a token is ground-truth foreground when at least half its pixels are the object


@dataclass(frozen=True)
class TokenArrays:
    """Per (image, view, token) arrays of one labeler over some rows; `labels` per image (-1 unknown)."""

    confidence: np.ndarray      # (n, S, T) max probability
    argmax: np.ndarray          # (n, S, T) top-1 class
    p_label: np.ndarray         # (n, S, T) probability of the image class (class-head top-1 if unknown)
    tail: np.ndarray            # (n, S, T) probability outside the stored top-k
    gumbel: np.ndarray          # (n, S, T) one Gumbel draw
    cls_argmax: np.ndarray      # (n, S) class-head top-1
    labels: np.ndarray          # (n,)
    object_share: np.ndarray | None = None   # (n, S, T) share of each token's pixels on the class object

    def __post_init__(self) -> None:
        shape = self.confidence.shape
        for name in ("argmax", "p_label", "tail", "gumbel") + (("object_share",) if self.object_share is not None else ()):
            if getattr(self, name).shape != shape:
                raise ValueError(f"TokenArrays.{name} has shape {getattr(self, name).shape}, expected {shape}")
        if self.cls_argmax.shape != shape[:2] or self.labels.shape != shape[:1]:
            raise ValueError(f"TokenArrays: cls_argmax {self.cls_argmax.shape} / labels {self.labels.shape} "
                             f"do not match (n, S) = {shape[:2]}")


def quality_numbers(a: TokenArrays, softmax_threshold: float = 0.5, bins: int = 20) -> dict:
    """Everything `report.json` holds about label quality.

    Foreground for the confidence histogram (paper Fig. 2e) is the ground-truth mask when there is one,
    else "token top-1 == image class" (said in `split_by`).
    """
    known = a.labels >= 0
    lab = a.labels[:, None, None]
    is_label = (a.argmax == lab)[known]
    out = {
        "images": int(a.labels.size), "views": int(a.confidence.shape[1]), "tokens_per_view": int(a.confidence.shape[2]),
        "images_with_class": int(known.sum()),
        "confidence": summary(a.confidence),
        "top1_is_image_class": float(is_label.mean()) if is_label.size else float("nan"),
        "p_image_class": summary(a.p_label[known]),
        "tail_mass": {**summary(a.tail), "histogram": histogram(a.tail, bins)},
        "gumbel_changes_argmax": change_rate(a.gumbel, a.argmax),
        "class_head_top1_is_image_class": float((a.cls_argmax == a.labels[:, None])[known].mean()) if known.any() else float("nan"),
    }
    if a.object_share is not None:
        truth = a.object_share >= FOREGROUND_SHARE
        split_by = "ground-truth mask"
    else:
        truth = a.argmax == lab
        split_by = "token top-1 == image class"
    fg, bg = a.confidence[truth & known[:, None, None]], a.confidence[~truth & known[:, None, None]]
    out["confidence_hist"] = {"split_by": split_by, "foreground": histogram(fg, bins), "background": histogram(bg, bins),
                              "foreground_mean": float(fg.mean()) if fg.size else float("nan"),
                              "background_mean": float(bg.mean()) if bg.size else float("nan")}
    if a.object_share is not None:
        t = truth[known]
        out["masks"] = {
            "object_token_share": float(t.mean()) if t.size else float("nan"),
            "foreground_rule": f"object covers >= {FOREGROUND_SHARE:.0%} of the token",
            "argmax": foreground_scores(is_label, t),
            "softmax_threshold": {**foreground_scores((a.p_label >= softmax_threshold)[known], t),
                                  "threshold": softmax_threshold},
            "gumbel": foreground_scores((a.gumbel == lab)[known], t),
        }
    return out
