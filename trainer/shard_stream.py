"""Shards streamed through torch DataLoaders: which worker reads which shard in which epoch, where each worker
is in its epoch, and the two DataLoader lanes that overlap one epoch's end with the next one's start. The
loaders of `trainer.loader` (student, stage-1 labeler, evaluation) are a `ShardStream` with their own pipeline.

Sharding: this epoch's shard list is shuffled by (run seed, epoch) here — webdataset's own shard
shuffle is seeded once and repeats every epoch (docs/design.md "Library behaviour") — then split by rank
(`wds.split_by_node`, or an explicit rank/world size) and by DataLoader worker
(`wds.split_by_worker`), so over ranks × workers every shard, hence every sample, is read once per
epoch. Ranks may get different numbers of batches (shards differ in size): a DDP loop must stop
together (e.g. all-reduce a "have a batch" flag, or torch.distributed.algorithms.Join).

Position in the epoch (exact resume, docs/design.md "Exact resume"): each worker's stream is a pure
function of (seed, epoch, rank, worker). `position()` records, per worker, the DataLoader items
the training loop has taken and the samples the worker had handed on past its shuffle
(`EpochLedger.streamed`). `set_epoch(epoch, resume=position)` makes each worker replay its stream
to that point without decoding (`skip_consumed`) and first emit one placeholder per item already
taken, so the DataLoader's round-robin over workers lines up with the uninterrupted run; the
placeholders are dropped here. The batches that follow are exactly those the uninterrupted run
would have trained on. Skipped samples (corrupt image, invalid row, truncated tar) are counted in
`skipped`, never dropped silently.

Workers are persistent (started once, reused every epoch): the epoch and the shards to skip live in a
shared-memory tensor that `set_epoch` writes and every worker reads when its next epoch starts.
Workers never sit idle unnoticed: a rank with more workers than shards gets a warning (shards are
the unit of work split over workers).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
import weakref
from functools import partial
from itertools import islice
from typing import Iterable, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from labeler.jpeg_decode import fast_jpeg_decoder_in_use
from labeler.worker_priority import lower_worker_priority
from labelstore import StoreError
from trainer.epoch_lanes import EpochLanes
from trainer.epoch_ledger import EpochLedger
from trainer.errors import TrainCheckpointError, TrainerError
from trainer.packed_tensors import pack_tensors, unpack_tensors
from trainer.stages import track_shards

_SHARD_ORDER_TAG = 0x5348_5244  # "SHRD"


def epoch_shard_order(urls: Sequence[str], seed: int, epoch: int, shuffle: bool = True) -> list[str]:
    """This epoch's shard order: a permutation drawn from (run seed, epoch), identical on every rank."""
    if not shuffle:
        return list(urls)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_SHARD_ORDER_TAG, int(epoch))))
    return [urls[i] for i in rng.permutation(len(urls))]


def _keep_going(exn: Exception) -> bool:
    # A shard that cannot be opened or ends early: go on with the next one. The samples it did not
    # deliver are recorded as skipped by `enter_samples` (against the store's keys where we have them).
    warnings.warn(f"webdataset: {type(exn).__name__}: {exn}", stacklevel=2)
    return True


MAX_WORKERS = 256  # data workers per rank whose resume point the shared state can hold


class ShardStream(IterableDataset):
    """One epoch of batches from shards: order by (seed, epoch), split by rank then worker, then `pipeline`."""

    def __init__(self, urls: Sequence[str], pipeline, *, seed: int, shuffle_shards: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.urls, self.pipeline, self.seed, self.shuffle_shards = list(urls), pipeline, int(seed), shuffle_shards
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then RANK/WORLD_SIZE or torch.distributed)")
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size
        # [epoch, skip flag of each shard position] and each worker's resume point (items taken, samples
        # streamed): shared memory, so persistent workers see what set_epoch set.
        self._state = torch.zeros(1 + len(self.urls), dtype=torch.int64).share_memory_()
        self._resume = torch.zeros((MAX_WORKERS, 2), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def skip_shards(self) -> frozenset:
        return frozenset(int(i) for i in torch.nonzero(self._state[1:]).flatten())

    @property
    def resume(self) -> dict[int, tuple[int, int]]:
        """worker → (items taken, samples streamed) to continue from (empty: the start of the epoch)."""
        return {int(w): (int(self._resume[w, 0]), int(self._resume[w, 1])) for w in torch.nonzero(self._resume.any(1)).flatten()}

    def set_epoch(self, epoch: int, skip_shards: Iterable[int] = (),
                  resume: dict[int, tuple[int, int]] | None = None) -> None:
        skip = [int(p) for p in skip_shards]
        if any(not 0 <= p < len(self.urls) for p in skip):
            raise ValueError(f"skip_shards {sorted(skip)} outside this stream's {len(self.urls)} shard positions")
        if any(not 0 <= int(w) < MAX_WORKERS for w in (resume or {})):
            raise ValueError(f"resume: worker ids {sorted(resume)} outside 0..{MAX_WORKERS - 1}")
        self._state.zero_()
        self._state[0] = int(epoch)
        self._state[1:][skip] = 1
        self._resume.zero_()
        for w, (taken, streamed) in (resume or {}).items():
            self._resume[int(w), 0], self._resume[int(w), 1] = int(taken), int(streamed)

    def ranks(self) -> int:
        """The world this stream is split over: its explicit world_size, else WORLD_SIZE (1 when unset)."""
        return max(1, self.world_size if self.world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))

    def shards_per_rank(self) -> int:
        return math.ceil(len(self.urls) / self.ranks())

    def order(self, epoch: int | None = None) -> list[str]:
        return epoch_shard_order(self.urls, self.seed, self.epoch if epoch is None else epoch, self.shuffle_shards)

    def fork(self) -> "ShardStream":
        """The same stream with its own shared epoch state (a second DataLoader lane: trainer/epoch_lanes.py)."""
        other = copy.copy(self)
        other._state = torch.zeros_like(self._state).share_memory_()
        other._resume = torch.zeros_like(self._resume).share_memory_()
        return other

    def _split_by_rank(self, items):
        if self.rank is None:
            return wds.split_by_node(items)
        return islice(items, self.rank, None, self.world_size)

    def __iter__(self):
        epoch = self.epoch  # read once: the whole pass belongs to one epoch
        order = self.order(epoch)
        positions = {u: i for i, u in enumerate(order)}
        skip = self.skip_shards
        items = iter([{"url": u, "__pos__": i} for i, u in enumerate(order) if i not in skip])
        items = wds.split_by_worker(self._split_by_rank(items))
        ledger = EpochLedger()
        samples = wds.tariterators.tarfile_samples(track_shards(items, ledger), handler=_keep_going)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        stream_id = (self.rank if self.rank is not None else wds.utils.pytorch_worker_info()[0], worker)
        taken, ledger.resume_from = self.resume.get(worker, (0, 0))
        for _ in range(taken):  # placeholders for the items trained on before the checkpoint (see module doc)
            yield {"meta": {"worker": worker, "placeholder": True}}
        try:
            for item in self.pipeline(samples, ledger, positions, epoch, stream_id):
                item["meta"]["worker"] = worker
                # In a worker: the batch's tensors travel as one shared buffer (trainer/packed_tensors.py).
                yield pack_tensors(item) if info is not None else item
        except (StoreError, TrainerError) as e:
            if info is None:
                raise
            # In a worker, hand the error to the main process as data: raised there as itself, one line,
            # instead of torch's re-raise with the worker's traceback pasted into the message.
            yield {"meta": {"worker": worker, "error": e}}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode/render workers: one thread each, the cores go to the workers
    lower_worker_priority()  # the training process's launching thread comes first when the cores are all busy
    fast_jpeg_decoder_in_use()  # the decoder's probe at start-up, not inside the first batch


def _data_loader(stream: ShardStream, *, workers: int, pin_memory: bool, prefetch_factor: int) -> DataLoader:
    kw = dict(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init,
              persistent_workers=True) if workers > 0 else {}  # persistent: workers survive the epochs
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, **kw)


def _epoch_setup(epoch: int, skip: Sequence[int] = (), point: dict | None = None):
    """(key, configure) of one epoch for EpochLanes: the key says which pass a lane holds (epoch, skipped shard
    positions, resume point), `configure(stream)` sets a lane's stream up for it."""
    point = point or {}
    key = (int(epoch), tuple(skip), tuple(sorted(point.items())))
    return key, lambda stream: stream.set_epoch(epoch, skip, point)


class StreamLoader:
    """Iterates a ShardStream through a torch DataLoader (batches collated in the workers).

    `overlap_epochs` (with workers): `prefetch_epoch(e)` starts epoch e on a second DataLoader lane while
    this epoch is still read, so the step does not wait at the boundary (trainer/epoch_lanes.py).
    `num_samples`, when known, sizes `batches_per_epoch()` (also the estimate that says when to prefetch)."""

    def __init__(self, stream: ShardStream, *, workers: int, pin_memory: bool = False, prefetch_factor: int = 4,
                 overlap_epochs: bool = True, num_samples: int | None = None):
        self.stream, self.workers, self.pin_memory, self.prefetch_factor = stream, int(workers), pin_memory, prefetch_factor
        self.num_samples = num_samples  # samples of one epoch over all ranks (None: unknown)
        shards = stream.shards_per_rank()
        if self.workers > shards:
            warnings.warn(f"data.workers={self.workers} but each rank reads only {shards} shard(s): "
                          f"{self.workers - shards} worker(s) per rank will sit idle (a shard is read by one worker); "
                          f"write more, smaller shards or lower data.workers", stacklevel=3)
        # No reference back to self from the lanes: a cycle would leave the DataLoader iterators to the cycle
        # collector, which may close their queues before they tell the workers to exit (a 5 s wait each).
        make_loader = partial(_data_loader, workers=self.workers, pin_memory=pin_memory,
                              prefetch_factor=prefetch_factor)
        self._lanes = EpochLanes(stream, make_loader, overlap=overlap_epochs and self.workers > 0)
        weakref.finalize(self, self._lanes.close)  # workers stopped cleanly however this loader is collected
        self._epoch = stream.epoch
        self.done_shards: set[int] = set()
        self.skipped: list[dict] = []
        self._skipped_keys: set[tuple[str, str]] = set()
        self.samples_seen = 0
        self._taken: dict[int, int] = {}  # worker → DataLoader items taken this epoch (placeholders included)
        self._streamed: dict[int, int] = {}  # worker → samples past its shuffle when its last item was taken

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def overlap_epochs(self) -> bool:
        return self._lanes.overlap

    @property
    def num_shards(self) -> int:
        return len(self.stream.urls)

    def batches_per_epoch(self, world_size: int | None = None) -> int | None:
        """One epoch's batches on a rank, an estimate for schedules, progress bars and when to start the next
        epoch (exact when shards split evenly over ranks); None when the sample count is unknown.
        `world_size`: default the stream's (its explicit one, else WORLD_SIZE)."""
        if self.num_samples is None:
            return None
        world = self.stream.ranks() if world_size is None else max(1, world_size)
        return max(1, math.ceil(self.num_samples / world / self.stream.pipeline.cfg.batch_size))

    def set_epoch(self, epoch: int, skip_shards: Iterable[int] = (), resume: dict | None = None) -> None:
        """Select the epoch (shard order, view choice, aug seeds); `resume`: this rank's `position()` from a
        mid-epoch checkpoint, continued exactly. (`skip_shards` drops whole shards: not exact, tests only.)"""
        taken, streamed = {}, {}
        if resume:
            if int(resume.get("workers", -1)) != self.workers:
                raise TrainCheckpointError(
                    f"the checkpoint was written mid-epoch with data.workers={resume.get('workers')}, this run has "
                    f"data.workers={self.workers}: set data.workers={resume.get('workers')} to resume exactly")
            taken = {int(w): int(n) for w, n in resume["taken"].items()}
            streamed = {int(w): int(n) for w, n in resume["streamed"].items()}
        skip = sorted({int(p) for p in skip_shards})
        self._lanes.select(*_epoch_setup(epoch, skip, {w: (taken[w], streamed.get(w, 0)) for w in taken}))
        self._epoch = int(epoch)
        self.done_shards = set(skip) | set((resume or {}).get("done_shards", ()))
        self.skipped, self.samples_seen = [], int((resume or {}).get("samples_seen", 0))
        self._skipped_keys = {(u, k) for u, k in (resume or {}).get("skipped_keys", ())}
        self._taken, self._streamed = taken, streamed

    def close(self) -> None:
        """Stop the data workers now (the next iteration starts new ones)."""
        self._lanes.close()

    def prefetch_epoch(self, epoch: int) -> bool:
        """Start epoch `epoch` (from its beginning) on the other lane now; a later `set_epoch(epoch)` reads it.
        No effect without `overlap_epochs`. Returns whether a pass was started."""
        return self._lanes.prefetch(*_epoch_setup(epoch))

    def position(self) -> dict:
        """This rank's exact place in the epoch (plain values: it goes into the checkpoint as is)."""
        return {"epoch": self.epoch, "workers": self.workers, "taken": {str(w): n for w, n in self._taken.items()},
                "streamed": {str(w): n for w, n in self._streamed.items()}, "done_shards": sorted(self.done_shards),
                "samples_seen": self.samples_seen, "skipped": self.num_skipped,
                "skipped_keys": sorted([u, k] for u, k in self._skipped_keys)}

    @property
    def num_skipped(self) -> int:
        return len(self._skipped_keys)

    def __iter__(self):
        for item in self._lanes.open():
            item = unpack_tensors(item)
            meta = item.pop("meta")
            worker = meta["worker"]
            self._taken[worker] = self._taken.get(worker, 0) + 1
            if meta.get("placeholder"):
                continue
            if "error" in meta:
                raise meta["error"]
            self._streamed[worker] = meta["streamed"]
            self.done_shards.update(meta["done_shards"])
            for skip in meta["skipped"]:  # a resumed epoch may meet a skip again: count each sample once
                if (skip["url"], skip["key"]) not in self._skipped_keys:
                    self._skipped_keys.add((skip["url"], skip["key"]))
                    self.skipped.append(skip)
            if "label" in item:  # not a meta-only item
                self.samples_seen += len(item["label"])
                yield item
