"""ImageNet-C mCE / relative mCE, IN-C accuracy, IN-A/IN-R subsets and retention: pure math."""
import pytest

from trainer.robustness import (
    ALEXNET_CLEAN_ERROR, ALEXNET_MEAN_ERROR, CORRUPTIONS, corruption_accuracy, corruption_errors,
    mean_corruption_error, relative_mean_corruption_error, retention, subset_class_indices,
)


def alexnet_like(scale=1.0):
    return {c: [ALEXNET_MEAN_ERROR[c] * scale] * 5 for c in CORRUPTIONS}


def test_all_fifteen_corruptions_including_jpeg():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15 and "jpeg_compression" in CORRUPTIONS
    assert set(ALEXNET_MEAN_ERROR) == set(CORRUPTIONS)


def test_alexnet_itself_scores_mce_one_and_half_its_errors_score_half():
    assert mean_corruption_error(alexnet_like()) == pytest.approx(1.0)
    assert mean_corruption_error(alexnet_like(0.5)) == pytest.approx(0.5)


def test_mce_by_hand_one_corruption_differs():
    errors = alexnet_like()
    errors["jpeg_compression"] = [0.0, 0.1, 0.2, 0.3, 0.4]  # mean 0.2
    expected = (14 + 0.2 / 0.606500) / 15
    assert mean_corruption_error(errors) == pytest.approx(expected)
    assert corruption_errors(errors)["jpeg_compression"] == pytest.approx(0.2 / 0.6065)


def test_relative_mce_of_alexnet_is_one_and_of_a_shift_free_model_is_zero():
    assert relative_mean_corruption_error(alexnet_like(), ALEXNET_CLEAN_ERROR) == pytest.approx(1.0)
    flat = {c: [0.3] * 5 for c in CORRUPTIONS}
    assert relative_mean_corruption_error(flat, clean_error=0.3) == pytest.approx(0.0)


def test_corruption_accuracy_is_mean_accuracy_not_mce():
    errors = {c: [0.1, 0.2, 0.3, 0.4, 0.5] for c in CORRUPTIONS}
    assert corruption_accuracy(errors) == pytest.approx(0.7)
    assert mean_corruption_error(errors) != pytest.approx(corruption_accuracy(errors))


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.pop("jpeg_compression"), "missing"),
    (lambda e: e.__setitem__("JPEG_compression", [0.1] * 5), "unknown"),
    (lambda e: e.__setitem__("fog", [0.1] * 4), "severities"),
    (lambda e: e.__setitem__("fog", [0.1, 0.1, 1.5, 0.1, 0.1]), "fog severity 3"),
])
def test_bad_corruption_tables_are_refused_with_the_name(mutate, message):
    errors = alexnet_like()
    mutate(errors)
    with pytest.raises(ValueError, match=message):
        mean_corruption_error(errors)


@pytest.mark.parametrize("subset", ["imagenet_a", "imagenet_r"])
def test_subset_indices_are_200_sorted_distinct_imagenet_classes(subset):
    idx = subset_class_indices(subset)
    assert len(idx) == 200 and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < 1000


def test_subsets_differ_and_unknown_subset_is_refused():
    assert subset_class_indices("imagenet_a") != subset_class_indices("imagenet_r")
    with pytest.raises(ValueError, match="imagenet_b"):
        subset_class_indices("imagenet_b")


def test_retention():
    assert retention(0.4, 0.8) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        retention(0.4, 0.0)
