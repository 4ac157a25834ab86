"""trainer.bench's end-to-end figures: the checkpoint pauses are counted apart from the step's host time."""
from __future__ import annotations

import pytest

from trainer.bench_figures import EndToEnd


def test_the_checkpoint_pauses_are_not_model_time_and_the_rate_between_them_is_given():
    run = EndToEnd(images=1280, seconds=1.0, loader_wait_s=0.1, steps=10, targets_s=0.2,
                   checkpoint_pauses=(0.15, 0.05))
    split = run.split()
    assert split.rest_ms == pytest.approx(1e3 * (1.0 - 0.1 - 0.2 - 0.2) / 10)  # 50 ms: pauses not in it
    assert split.checkpoint_ms == pytest.approx((150.0, 50.0))
    assert run.images_per_s == pytest.approx(1280.0)
    assert run.images_per_s_between_checkpoints == pytest.approx(1280 / 0.8)
    assert EndToEnd(images=10, seconds=2.0, loader_wait_s=0.0).images_per_s_between_checkpoints == pytest.approx(5.0)


def test_the_background_writes_are_measured_against_the_window():
    import torch

    from trainer.bench import TimedBatches
    from trainer.checkpoint import StopRequest

    timed = TimedBatches(lambda epoch, position: iter(()), warmup=0, seconds=1.0, stop=StopRequest(),
                         device=torch.device("cpu"))
    timed.start, timed.end = 10.0, 12.0
    run = timed.figures(checkpoint_pauses=((9.5, 0.1), (10.5, 0.2)),
                        checkpoint_writes=((9.0, 1.5), (11.5, 0.2), (11.9, 0.5)))
    assert run.checkpoint_pauses == (0.2,)  # the pause that began inside the window
    assert run.checkpoint_writing_s == pytest.approx(0.5 + 0.2 + 0.1)  # each write's overlap with it


def test_a_loader_alone_is_read_epoch_after_epoch_for_at_least_its_seconds(monkeypatch):
    """The clock starts at the first batch (workers starting are not in the figure) and runs until both the
    images and the seconds asked for are read, across epochs: a window of one or two bursts of batches would
    measure mostly where it happened to end."""
    import time

    import trainer.bench as bench

    epochs_read = []

    def fake_epochs(loader):
        def epoch_batches(epoch, position):
            epochs_read.append(epoch)
            for _ in range(3):  # three batches of 4 images per epoch, 20 ms apart
                time.sleep(0.02)
                yield {"label": [0] * 4}, None
        return epoch_batches

    monkeypatch.setattr(bench, "loader_epochs", fake_epochs)
    rate, images, seconds = bench._time_loader(object(), min_images=8, min_seconds=0.15)
    assert seconds >= 0.15 and images >= 8 and images % 4 == 0
    assert len(epochs_read) >= 3  # several epochs, not one
    assert rate == pytest.approx(images / seconds)
    assert 4 / 0.02 * 0.5 < rate < 4 / 0.02 * 1.05  # about 200 images/s: the first batch's wait left out
    rate, images, _ = bench._time_loader(object(), min_images=8)  # no seconds asked: the images decide
    assert images == 8


def test_the_bench_settings_refuse_windows_that_measure_nothing():
    from trainer.bench import BenchSettings

    with pytest.raises(ValueError, match="--seconds must be > 0"):
        BenchSettings(shards=("s.tar",), labels="l.zarr", labeler="tl", seconds=0)
    with pytest.raises(ValueError, match="--loader-seconds must be >= 0"):
        BenchSettings(shards=("s.tar",), labels="l.zarr", labeler="tl", loader_seconds=-1)
