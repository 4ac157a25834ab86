"""Which stored view a row uses in an epoch (docs/design.md "Token labels at train time").

One view index per row-chunk per epoch, drawn from (run seed, epoch, chunk): a read of one view
for a block of rows is one store chunk, so every byte read is used, and the choice is the same
whatever the number of ranks or data workers (it depends on the row, never on who reads it).
"""
from __future__ import annotations

import numpy as np

# Separates this stream from other uses of the run seed (student augs, mixing) that share it.
_VIEW_CHOICE_TAG = 0x5649_4557  # "VIEW"


def chunk_of(row: int | np.ndarray, rows_per_chunk: int):
    """The store chunk (along rows) holding `row`."""
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    return np.asarray(row) // rows_per_chunk if isinstance(row, np.ndarray) else int(row) // rows_per_chunk


def choose_view(run_seed: int, epoch: int, chunk: int, num_views: int) -> int:
    """The view index used by every row of `chunk` in `epoch` (uniform over the S stored views)."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if min(run_seed, epoch, chunk) < 0:
        raise ValueError(f"run_seed, epoch and chunk must be >= 0, got {(run_seed, epoch, chunk)}")
    ss = np.random.SeedSequence(int(run_seed), spawn_key=(_VIEW_CHOICE_TAG, int(epoch), int(chunk)))
    return int(np.random.default_rng(ss).integers(num_views))


def view_choice_table(run_seed: int, epoch: int, num_chunks: int, num_views: int) -> np.ndarray:
    """Every chunk's view for an epoch, (num_chunks,) int — what the trainer logs for the record."""
    return np.array([choose_view(run_seed, epoch, c, num_views) for c in range(num_chunks)], dtype=np.int64)
