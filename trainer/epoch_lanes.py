"""Two DataLoaders over one stream, so the next epoch's workers start before this epoch ends.

A torch DataLoader starts an epoch only once the previous one is exhausted: its persistent workers then
begin their streams again (open a shard, read label chunks, decode a whole batch), and the training step
waits for all of it. On short epochs (a small dataset, a bench, a capped `max_steps_per_epoch`) that wait
is a large share of every epoch. torch has no way to prefetch across that boundary, so we keep two lanes:
each is a DataLoader with its own persistent workers and its own copy of the stream's shared epoch state.
The epoch being trained reads one lane while the next epoch fills the other lane's prefetch queues.

Each epoch is still one fresh pass of one DataLoader over a stream that is a pure function of (seed,
epoch, rank, worker), so batch order and exact resume are exactly those of a single loader. The cost is a
second set of worker processes, idle except while they fill their queues.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch


@dataclass
class Lane:
    stream: object  # a trainer.shard_stream.ShardStream: this lane's copy (its own shared epoch state)
    loader: object = None  # its DataLoader, built on first use
    iterator: object = None  # the DataLoader's (persistent) iterator of the pass started last
    started: bool = False  # a pass was started for `key` and nobody has read it yet
    key: Hashable = None  # the epoch this lane is set up for (epoch, skipped shards, resume point)


class EpochLanes:
    """The lanes of one StreamLoader. `select` sets up the epoch about to be read (taking a lane that was
    started ahead for exactly that epoch), `open` starts it if it was not, `prefetch` starts an epoch on
    the other lane ahead of time. With `overlap` False there is one lane and `prefetch` does nothing."""

    def __init__(self, stream, make_loader: Callable[[object], object], *, overlap: bool):
        self._lanes = [Lane(stream)]  # the second lane, made on first prefetch, reads `stream.fork()`
        self._make_loader = make_loader
        self.overlap = bool(overlap)
        self._current = 0

    @property
    def current(self) -> Lane:
        return self._lanes[self._current]

    def _other(self) -> int:
        if len(self._lanes) == 1:
            self._lanes.append(Lane(self._lanes[0].stream.fork()))
        return 1 - self._current

    def select(self, key: Hashable, configure: Callable[[object], None]) -> None:
        """Make `key`'s epoch the one `open` reads: a lane already started for it, else a lane set up now by
        `configure(stream)`. A lane started ahead for another epoch is set up again when it is next used."""
        for i, lane in enumerate(self._lanes):
            if lane.started and lane.key == key:
                self._current = i
                return
        if self.current.started and len(self._lanes) == 2 and not self._lanes[1 - self._current].started:
            self._current = 1 - self._current  # keep the pass started ahead; it may still be asked for
        lane = self.current
        configure(lane.stream)
        lane.key, lane.started = key, False

    def open(self):
        """The selected epoch's batches (a DataLoader iterator), started now unless it was started ahead."""
        lane = self.current
        if not lane.started:
            self._start(lane)
        lane.started = False  # being read: never handed out again
        return lane.iterator

    def prefetch(self, key: Hashable, configure: Callable[[object], None]) -> bool:
        """Start `key`'s epoch on the lane not being read, so its workers fill their queues now. Returns
        whether a pass was started (False: overlap off, or that epoch is already started ahead)."""
        if not self.overlap:
            return False
        i = self._other()
        lane = self._lanes[i]
        if lane.started and lane.key == key:
            return False
        configure(lane.stream)
        lane.key = key
        self._start(lane)
        lane.started = True
        return True

    def close(self) -> None:
        """Drop every lane's DataLoader: its iterator's destructor stops the workers (each is told to exit, then
        joined). Called when the StreamLoader is collected, also when the cycle collector is the one collecting
        it (an error's traceback holds it in a cycle): the DataLoaders are then still reachable from here, so
        their queues are intact when the workers are told to exit; collected with the cycle, a queue can be
        closed first and each worker waits out its join timeout."""
        for lane in self._lanes:
            lane.iterator = lane.loader = None
            lane.started = False

    def _start(self, lane: Lane) -> None:
        if lane.loader is None:
            lane.loader = self._make_loader(lane.stream)
        # Starting a DataLoader pass may draw its worker base seed from the global torch RNG: keep that
        # draw out of the training RNG stream, wherever in the epoch the pass is started.
        with torch.random.fork_rng(devices=[]):
            lane.iterator = iter(lane.loader)
