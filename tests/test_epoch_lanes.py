"""Overlapped epochs (trainer/epoch_lanes.py): the next epoch's workers start while this epoch is read, and the
epoch read is the pass that was started ahead."""
import time

import pytest
import torch
import webdataset as wds

from trainer.epoch_lanes import EpochLanes
from trainer.shard_stream import ShardStream, StreamLoader
from trainer.run_stage import loader_epochs


class FakeStream:
    def __init__(self, log):
        self.log, self.epoch = log, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def fork(self):
        self.log.append("fork")
        return FakeStream(self.log)


class FakeLoader:
    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def __iter__(self):
        self.log.append(("start", self.stream.epoch))
        return iter([self.stream.epoch] * 2)


def _lanes(overlap=True):
    log = []
    first = FakeStream(log)
    return EpochLanes(first, lambda s: FakeLoader(s, log), overlap=overlap), log


def _read(lanes, epoch):
    lanes.select(epoch, lambda s: s.set_epoch(epoch))
    return list(lanes.open())


def test_a_prefetched_epoch_is_read_without_starting_it_again():
    lanes, log = _lanes()
    assert _read(lanes, 0) == [0, 0]
    assert lanes.prefetch(1, lambda s: s.set_epoch(1)) is True
    assert lanes.prefetch(1, lambda s: s.set_epoch(1)) is False  # already started ahead
    assert _read(lanes, 1) == [1, 1]
    assert lanes.prefetch(2, lambda s: s.set_epoch(2)) is True
    assert _read(lanes, 2) == [2, 2]
    assert log == [("start", 0), "fork", ("start", 1), ("start", 2)]  # one lane forked, each epoch started once


def test_an_epoch_other_than_the_prefetched_one_is_started_on_its_own():
    lanes, log = _lanes()
    _read(lanes, 0)
    lanes.prefetch(1, lambda s: s.set_epoch(1))
    assert _read(lanes, 5) == [5, 5]  # e.g. a resumed epoch: set up and started where it is asked for
    assert _read(lanes, 1) == [1, 1]  # the pass started ahead is still there for its epoch
    assert log == [("start", 0), "fork", ("start", 1), ("start", 5)]
    assert _read(lanes, 1) == [1, 1] and log[-1] == ("start", 1)  # read once: asked again, it starts again


def test_without_overlap_there_is_one_lane_and_no_prefetch():
    lanes, log = _lanes(overlap=False)
    _read(lanes, 0)
    assert lanes.prefetch(1, lambda s: s.set_epoch(1)) is False
    _read(lanes, 1)
    assert log == [("start", 0), ("start", 1)]


# --- the real StreamLoader: worker processes ----------------------------------------------------------

class MarkingPipeline:
    """One item per sample; each worker notes (in a file) every pass it starts, with the pass's epoch."""

    def __init__(self, folder):
        self.folder = folder

    def __call__(self, samples, ledger, positions, epoch, stream_id):
        with open(self.folder / f"e{epoch}-w{stream_id[1]}", "a") as f:
            f.write("pass\n")
        for n, sample in enumerate(samples, 1):
            yield {"label": torch.tensor([int(sample["cls"])]), "key": sample["__key__"],
                   "meta": {"streamed": n, "done_shards": [], "skipped": []}}


@pytest.fixture
def marked(tmp_path):
    urls = []
    for s in range(2):
        urls.append(str(tmp_path / f"m-{s:06d}.tar"))
        with wds.TarWriter(urls[-1]) as w:
            for i in range(6):
                w.write({"__key__": f"s{s}_{i}", "cls": str(i).encode()})
    return urls, tmp_path


def _passes(folder, epoch):
    return {w: (folder / f"e{epoch}-w{w}").read_text().count("pass") if (folder / f"e{epoch}-w{w}").exists() else 0
            for w in (0, 1)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", [True, False])
def test_the_next_epoch_starts_while_this_one_is_read(marked, overlap):
    urls, folder = marked
    loader = StreamLoader(ShardStream(urls, MarkingPipeline(folder), seed=0, rank=0, world_size=1), workers=2,
                          prefetch_factor=2, overlap_epochs=overlap)
    epochs = loader_epochs(loader, epochs=2)
    batches = epochs(0, {})
    first = [next(batches)[0]["key"]]  # the epoch length is unknown: the next one starts after the first batch
    deadline = time.monotonic() + 60
    while overlap and _passes(folder, 1) != {0: 1, 1: 1} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _passes(folder, 1) == ({0: 1, 1: 1} if overlap else {0: 0, 1: 0})  # epoch 0 still being read
    epoch0 = first + [b["key"] for b, _ in batches]
    epoch1 = [b["key"] for b, _ in epochs(1, {})]
    assert _passes(folder, 1) == {0: 1, 1: 1}  # the pass started ahead is the one read
    assert sorted(epoch0) == sorted(epoch1) and len(epoch0) == 12
    assert loader.position()["epoch"] == 1 and loader.samples_seen == 12
    # the same batches in the same order as a fresh loader that reads epoch 1 alone
    fresh = StreamLoader(ShardStream(urls, MarkingPipeline(folder), seed=0, rank=0, world_size=1), workers=2,
                         prefetch_factor=2, overlap_epochs=False)
    fresh.set_epoch(1)
    assert [b["key"] for b in fresh] == epoch1


@pytest.mark.timeout(60)
def test_a_dropped_loader_stops_its_workers_at_once(marked):
    """No reference cycle holds the lanes: dropping the loader shuts its DataLoaders down there and then (a
    cycle would leave them to the cycle collector, which can close their queues before the workers are told
    to exit, and each then waits for its join timeout)."""
    import gc
    import weakref

    urls, folder = marked
    loader = StreamLoader(ShardStream(urls, MarkingPipeline(folder), seed=0, rank=0, world_size=1), workers=2,
                          prefetch_factor=2)
    epochs = loader_epochs(loader, epochs=2)
    for e in range(2):
        list(epochs(e, {}))
    lanes = [weakref.ref(lane.loader) for lane in loader._lanes._lanes]
    assert len(lanes) == 2 and all(ref() is not None for ref in lanes)
    del epochs
    gc.disable()
    try:
        del loader
        assert all(ref() is None for ref in lanes)
    finally:
        gc.enable()


class FailingPipeline:
    def __call__(self, samples, ledger, positions, epoch, stream_id):
        from trainer.errors import TrainerError
        for _ in samples:
            raise TrainerError("this shard is bad")
        yield  # a generator


@pytest.mark.timeout(60)
def test_the_workers_are_stopped_when_an_error_leaves_the_loader_to_the_cycle_collector(marked):
    import gc

    from trainer.errors import TrainerError

    urls, _ = marked
    loader = StreamLoader(ShardStream(urls, FailingPipeline(), seed=0, rank=0, world_size=1), workers=2,
                          prefetch_factor=2)
    loader.set_epoch(0)
    with pytest.raises(TrainerError, match="this shard is bad") as caught:
        list(loader)
    lanes = loader._lanes
    assert lanes.current.loader is not None
    del loader, caught  # the traceback kept a cycle through the loader's frames: only gc frees it
    gc.collect()
    # The loader's finalizer dropped the DataLoaders while they were still reachable from the lanes: their
    # iterators stopped the workers with intact queues (not the cycle collector, in whatever order).
    assert all(lane.loader is None and lane.iterator is None for lane in lanes._lanes)
