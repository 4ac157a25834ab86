"""labeler.store_writers: shard writes in writer processes land exactly as in-thread writes, an error in a
writer comes back as itself, and a writer that dies fails only its write (the shard stays undone)."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from labeler.bench_shards import make_bench_shards
from labeler.store_writers import StoreWriteFailed, StoreWriters
from labeler.worker_settings import WorkerSettings, resolve_store_writers
from labelstore import InvalidLabels, LabelStore, ShardConflict

from test_work_unit import labelled, read_labels


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_bench_shards(tmp_path_factory.mktemp("bench"), shards=2, per_shard=5, min_size=40, max_size=90,
                             num_classes=10)


def test_store_writers_resolve_per_decode_pool():
    auto = WorkerSettings(checkpoint=None)
    assert resolve_store_writers(auto, "cuda") == 4 and resolve_store_writers(auto, "cpu") == 0
    assert resolve_store_writers(WorkerSettings(checkpoint=None, decode_pool="process"), "cpu") == 4
    assert resolve_store_writers(WorkerSettings(checkpoint=None, store_writers=2), "cpu") == 2
    with pytest.raises(ValueError, match="store_writers must be >= 0, or -1"):
        WorkerSettings(checkpoint=None, store_writers=-2)
    with pytest.raises(ValueError, match="needs its LabelerStore"):
        StoreWriters("x.zarr", "t", 0)


@pytest.mark.timeout(300)
def test_writer_processes_write_what_the_caller_thread_writes(shards, tmp_path):
    in_thread, _, work = labelled(tmp_path / "a", shards, store_writers=0)
    assert work.writers.processes == 0
    in_procs, _, work = labelled(tmp_path / "b", shards, store_writers=2)
    assert work.writers.processes == 2
    got, want = read_labels(in_procs), read_labels(in_thread)
    assert set(got) == set(want)
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    lab = LabelStore.open(in_procs).labeler("t")
    assert np.asarray(lab.array("done")[:]).tolist() == [1, 1]


def _shard_fields(path: str, shard: int) -> dict:
    """The fields of one stored shard, as a `write_shard` call gets them."""
    store = LabelStore.open(path)
    lab, info = store.labeler("t"), store.shard(shard)
    rows = slice(info.first_row, info.first_row + info.num_samples)
    arrays = {p: np.asarray(lab.array(p)[rows]) for p in lab.array_paths if p != "done"}
    samples = store.samples
    from labelstore import EncodedLogits
    return dict(keys=[str(k) for k in np.asarray(samples.key[rows])], labels=np.asarray(samples.label[rows]),
                image_hw=np.asarray(samples.image_hw[rows]), valid=np.asarray(samples.valid[rows]).astype(bool),
                params=arrays["views/params"],
                tokens=EncodedLogits(arrays["tokens/topk_logit"], arrays["tokens/topk_class"], arrays["tokens/tail_lse"]),
                cls=EncodedLogits(arrays["cls/topk_logit"], arrays["cls/topk_class"], arrays["cls/tail_lse"]))


@pytest.mark.timeout(300)
def test_a_writer_error_comes_back_as_itself_and_a_dead_writer_fails_its_write(shards, tmp_path):
    path, _, _ = labelled(tmp_path, shards, store_writers=0)
    fields = _shard_fields(path, 0)
    writers = StoreWriters(path, "t", 1)
    try:
        writers.start()
        writers.write(0, **fields)  # the same rows again: fine
        with pytest.raises(InvalidLabels, match="shard 0 .*params has shape"):
            writers.write(0, **{**fields, "params": fields["params"][:, :1]})
        with pytest.raises(ShardConflict):
            writers.write(1, **fields)  # shard 0's keys into shard 1
        pid = next(iter(writers._pool._processes))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(StoreWriteFailed, match="died while shard 0 was being written"):
            writers.write(0, **fields)
        writers.write(0, **fields)  # new writer processes
    finally:
        writers.close()
    assert np.asarray(LabelStore.open(path).labeler("t").array("done")[:]).tolist() == [1, 1]

