"""Robustness metrics (ImageNet-C mCE, relative mCE, IN-A / IN-R subsets, retention) as pure math.

Definitions follow Hendrycks & Dietterich 2019 ("Benchmarking neural network robustness to common
corruptions and perturbations"): per corruption c, CE_c = mean-over-severities error / AlexNet's
mean error on c; mCE = mean of CE_c over all 15 corruptions. Errors are fractions in [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib import resources

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# AlexNet's top-1 error on each corruption, averaged over severities 1-5 (the published normalisers).
ALEXNET_MEAN_ERROR: Mapping[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
# AlexNet's clean top-1 error: 43.5 % in the ImageNet-C paper's table; torchvision's AlexNet weights
# measure 56.522 % top-1 accuracy, i.e. 0.43478, which rounds to the paper's figure.
ALEXNET_CLEAN_ERROR = 0.43478

SUBSET_INDEX_FILES: Mapping[str, str] = {"imagenet_a": "imagenet_a_indices.txt", "imagenet_r": "imagenet_r_indices.txt"}


def _check_errors(errors: Mapping[str, Sequence[float]]) -> None:
    """All 15 corruptions, each with 5 severities, each an error fraction; else a message naming what is wrong.

    Refusing partial results on purpose: an mCE over 14 corruptions is not comparable with published ones.
    """
    unknown = sorted(set(errors) - set(CORRUPTIONS))
    missing = [c for c in CORRUPTIONS if c not in errors]
    if unknown:
        raise ValueError(f"unknown ImageNet-C corruption(s) {unknown}; expected names: {list(CORRUPTIONS)}")
    if missing:
        raise ValueError(f"ImageNet-C corruption(s) missing: {missing} (mCE needs all 15)")
    for name, per_severity in errors.items():
        if len(per_severity) != len(SEVERITIES):
            raise ValueError(f"ImageNet-C {name}: expected {len(SEVERITIES)} severities, got {len(per_severity)}")
        for s, e in zip(SEVERITIES, per_severity):
            if not (0.0 <= float(e) <= 1.0) or math.isnan(float(e)):
                raise ValueError(f"ImageNet-C {name} severity {s}: error {e!r} is not a fraction in [0, 1]")


def corruption_errors(errors: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """CE_c per corruption: the model's mean error over severities divided by AlexNet's."""
    _check_errors(errors)
    return {c: (sum(errors[c]) / len(SEVERITIES)) / ALEXNET_MEAN_ERROR[c] for c in CORRUPTIONS}


def mean_corruption_error(errors: Mapping[str, Sequence[float]]) -> float:
    """mCE: mean over the 15 corruptions of CE_c (1.0 = AlexNet; lower is better)."""
    ce = corruption_errors(errors)
    return sum(ce.values()) / len(ce)


def relative_mean_corruption_error(errors: Mapping[str, Sequence[float]], clean_error: float,
                                   alexnet_clean_error: float = ALEXNET_CLEAN_ERROR) -> float:
    """Relative mCE: how much accuracy *drops* under corruption, normalised by AlexNet's drop.

    relative CE_c = Σ_s (E_{s,c} − E_clean) / Σ_s (E^AlexNet_{s,c} − E^AlexNet_clean); the AlexNet sum over
    severities is 5 × (its mean error − its clean error).
    """
    _check_errors(errors)
    if not 0.0 <= clean_error <= 1.0:
        raise ValueError(f"clean_error {clean_error!r} is not a fraction in [0, 1]")
    rel = []
    for c in CORRUPTIONS:
        model_drop = sum(float(e) - clean_error for e in errors[c])
        alexnet_drop = len(SEVERITIES) * (ALEXNET_MEAN_ERROR[c] - alexnet_clean_error)
        rel.append(model_drop / alexnet_drop)
    return sum(rel) / len(rel)


def corruption_accuracy(errors: Mapping[str, Sequence[float]]) -> float:
    """"IN-C accuracy" as the STL tables report it: mean top-1 accuracy over all corruptions and severities."""
    _check_errors(errors)
    return 1.0 - sum(sum(errors[c]) for c in CORRUPTIONS) / (len(CORRUPTIONS) * len(SEVERITIES))


def retention(robust_accuracy: float, clean_accuracy: float) -> float:
    """Retention = robust accuracy / clean accuracy (1.0 = no loss under the shift)."""
    if clean_accuracy <= 0.0:
        raise ValueError(f"retention needs a positive clean accuracy, got {clean_accuracy!r}")
    return robust_accuracy / clean_accuracy


def subset_class_indices(subset: str) -> list[int]:
    """The 200 ImageNet-1k class indices of ImageNet-A or ImageNet-R, from the lists timm ships.

    Logits are restricted to these columns before the argmax (both sets only contain these classes).
    """
    if subset not in SUBSET_INDEX_FILES:
        raise ValueError(f"unknown class subset {subset!r}; expected one of {sorted(SUBSET_INDEX_FILES)}")
    text = resources.files("timm.data").joinpath("_info", SUBSET_INDEX_FILES[subset]).read_text()
    indices = [int(line) for line in text.split()]
    if len(indices) != 200 or len(set(indices)) != 200 or not all(0 <= i < 1000 for i in indices):
        raise ValueError(f"timm's {SUBSET_INDEX_FILES[subset]} does not hold 200 distinct ImageNet-1k indices")
    return indices
