"""trainer.batch_erasing: timm's random erasing for a whole batch, with timm's boxes."""
from __future__ import annotations

import random

import pytest
import torch
from timm.data.random_erasing import RandomErasing

from trainer.batch_erasing import BatchRandomErasing
from trainer.student_augment import build_random_erasing


def _both(seed: int, x: torch.Tensor, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's per-image loop and the batched version on copies of x, from the same `random` state."""
    random.seed(seed)
    theirs = RandomErasing(device="cpu", **settings)(x.clone())
    random.seed(seed)
    ours = BatchRandomErasing(device="cpu", **settings)(x.clone())
    return theirs, ours


@pytest.mark.parametrize("max_count", [1, 3])
def test_constant_fill_erases_exactly_what_timm_erases(max_count):
    x = torch.randn(24, 3, 20, 27)
    for seed in range(5):
        theirs, ours = _both(seed, x, probability=0.6, mode="const", max_count=max_count)
        assert (theirs != x).any()  # something was erased
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_per_pixel_noise_erases_timms_boxes_with_fresh_noise():
    x = torch.randn(32, 3, 16, 16)
    theirs, ours = _both(7, x, probability=0.5, mode="pixel", max_count=1)
    assert torch.equal(ours != x, theirs != x)  # the same pixels erased
    erased = ours[ours != x]
    assert erased.numel() > 100 and abs(float(erased.mean())) < 0.3 and 0.7 < float(erased.std()) < 1.3


def test_random_colour_is_one_normal_colour_per_box_and_channel():
    x = torch.randn(16, 3, 18, 18)
    theirs, ours = _both(3, x, probability=1.0, mode="rand", max_count=1)
    changed = ours != x
    assert torch.equal(changed, theirs != x)
    for i in range(16):
        for ch in range(3):
            values = ours[i, ch][changed[i, ch]]
            if values.numel():
                assert torch.all(values == values[0])


def test_the_first_split_stays_clean_and_single_images_go_to_timm():
    x = torch.randn(8, 3, 12, 12)
    theirs, ours = _both(1, x, probability=1.0, mode="const", num_splits=2)
    assert torch.equal(ours[:4], x[:4]) and torch.equal(ours, theirs)
    image = torch.randn(3, 12, 12)
    random.seed(0)
    out = BatchRandomErasing(probability=1.0, mode="const", device="cpu")(image)
    assert out is image and (image == 0).any()  # timm's in-place path


def test_nothing_drawn_returns_the_batch_as_it_is():
    x = torch.randn(4, 3, 8, 8)
    assert BatchRandomErasing(probability=0.0, device="cpu")(x) is x


def test_the_trainer_erases_batches_on_a_gpu_and_image_by_image_on_a_cpu():
    assert type(build_random_erasing(0.25, "pixel", "cuda")) is BatchRandomErasing
    assert type(build_random_erasing(0.25, "pixel", "cpu")) is RandomErasing
    assert build_random_erasing(0.0, "pixel", "cuda") is None
