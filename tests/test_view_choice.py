"""View choice per (run seed, epoch, row-chunk): deterministic, uniform over views, independent of the reader."""
import numpy as np
import pytest

from trainer.view_choice import choose_view, chunk_of, view_choice_table


def test_deterministic_and_in_range():
    a = view_choice_table(7, 3, 200, 8)
    assert (a == view_choice_table(7, 3, 200, 8)).all()
    assert a.min() >= 0 and a.max() < 8 and a.dtype == np.int64
    assert all(a[c] == choose_view(7, 3, c, 8) for c in range(200))


def test_changes_with_epoch_and_seed():
    base = view_choice_table(0, 0, 100, 16)
    assert (base != view_choice_table(0, 1, 100, 16)).mean() > 0.8
    assert (base != view_choice_table(1, 0, 100, 16)).mean() > 0.8


def test_uniform_over_views():
    counts = np.bincount(view_choice_table(0, 0, 8000, 8), minlength=8)
    assert ((counts - 1000) ** 2 / 1000).sum() < 24.32  # chi-square, df 7, p = 0.001


def test_chunk_of_and_bad_arguments():
    assert chunk_of(127, 64) == 1 and (chunk_of(np.array([0, 63, 64]), 64) == [0, 0, 1]).all()
    assert choose_view(0, 0, 0, 1) == 0
    with pytest.raises(ValueError, match="num_views"):
        choose_view(0, 0, 0, 0)
    with pytest.raises(ValueError, match="rows_per_chunk"):
        chunk_of(3, 0)
