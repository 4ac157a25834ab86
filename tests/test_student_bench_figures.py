"""trainer.bench's end-to-end figures: the checkpoint pauses are counted apart from the step's host time."""
from __future__ import annotations

import pytest

from trainer.bench import EndToEnd


def test_the_checkpoint_pauses_are_not_model_time_and_the_rate_between_them_is_given():
    run = EndToEnd(images=1280, seconds=1.0, loader_wait_s=0.1, steps=10, targets_s=0.2,
                   checkpoint_pauses=(0.15, 0.05))
    split = run.split()
    assert split.rest_ms == pytest.approx(1e3 * (1.0 - 0.1 - 0.2 - 0.2) / 10)  # 50 ms: pauses not in it
    assert split.checkpoint_ms == pytest.approx((150.0, 50.0))
    assert run.images_per_s == pytest.approx(1280.0)
    assert run.images_per_s_between_checkpoints == pytest.approx(1280 / 0.8)
    assert EndToEnd(images=10, seconds=2.0, loader_wait_s=0.0).images_per_s_between_checkpoints == pytest.approx(5.0)
