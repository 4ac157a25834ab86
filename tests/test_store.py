"""Label store: layout, write/read round trip, validation, conflicts, resume, concurrency, verify."""
from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

import labelstore as L
from conftest import fake_shard


@pytest.fixture
def store(tmp_path, tiny_labeler_spec):
    st = L.LabelStore.create(tmp_path / "labels.zarr", seed=7, rows_per_chunk=8)
    st.register_shards([("a.tar", 10), ("b.tar", 5), ("c.tar", 8)])
    st.add_labeler(tiny_labeler_spec)
    return st


def test_shards_start_on_write_units_and_register_is_idempotent(store):
    assert [(s.first_row, s.num_samples, s.end) for s in store.shards] == [(0, 10, 16), (16, 5, 24), (24, 8, 32)]
    assert store.num_rows == 32 and store.samples.key.shape == (32,)
    again = store.register_shards([("b.tar", 5), ("d.tar", 1)])
    assert [s.index for s in again] == [1, 3] and store.num_rows == 40
    assert store.labeler("tiny").array("tokens/topk_logit").shape == (40, 3, 16, 4)
    assert store.labeler("tiny").done_mask().shape == (4,)
    with pytest.raises(L.ShardConflict, match="b.tar"):
        store.register_shards([("b.tar", 6)])


def test_layout_matches_design(store, tiny_labeler_spec):
    root = zarr.open_group(store.path, mode="r")
    assert root.attrs["format"] == "stl-labels" and root.attrs["schema_version"] == 2
    lab = root["labelers/tiny"]
    expect = {"views/params": ((32, 3, L.NUM_PARAMS), "float32"), "tokens/topk_logit": ((32, 3, 16, 4), "float16"),
              "tokens/topk_class": ((32, 3, 16, 4), "int16"), "tokens/tail_lse": ((32, 3, 16), "float16"),
              "cls/topk_logit": ((32, 3, 4), "float16"), "cls/topk_class": ((32, 3, 4), "int16"),
              "cls/tail_lse": ((32, 3), "float16"), "done": ((3,), "uint8")}
    for path, (shape, dtype) in expect.items():
        assert (lab[path].shape, str(lab[path].dtype)) == (shape, dtype), path
    # one view index for a block of rows is one chunk; a write unit of a shard is one file
    assert lab["tokens/topk_logit"].chunks == (8, 1, 16, 4) and lab["tokens/topk_logit"].shards == (8, 3, 16, 4)
    assert L.LabelerSpec.from_dict(dict(lab.attrs)) == dataclasses.replace(tiny_labeler_spec, seed=7)
    json.dumps(dict(lab.attrs))


def test_write_read_round_trip(store, tiny_labeler_spec):
    lab = store.labeler("tiny")
    batch = fake_shard(store, tiny_labeler_spec, 0)
    batch["valid"][2] = False
    lab.write_shard(0, errors=[{"key": batch["keys"][2], "reason": "truncated jpeg"}], **batch)
    assert lab.missing_shards() == [1, 2]

    reader = pickle.loads(pickle.dumps(L.LabelStore.open(store.path)))
    rl = pickle.loads(pickle.dumps(reader.labeler("tiny", expect=tiny_labeler_spec)))
    got = rl.read(slice(0, 10), 1)
    ok = np.arange(10) != 2
    np.testing.assert_array_equal(got["params"][ok], batch["params"][ok, 1])
    np.testing.assert_array_equal(got["tokens"].cls[ok], batch["tokens"].cls[ok, 1])
    np.testing.assert_array_equal(got["tokens"].logit[ok], batch["tokens"].logit[ok, 1])
    np.testing.assert_array_equal(got["cls"].tail_lse[ok], batch["cls"].tail_lse[ok, 1])
    assert (got["tokens"].cls[2] == -1).all() and (got["params"][2] == 0).all()  # invalid rows hold no data
    per_row = rl.read(np.array([9, 0, 3]), np.array([2, 0, 1]))
    np.testing.assert_array_equal(per_row["tokens"].cls, batch["tokens"].cls[[9, 0, 3], [2, 0, 1]])
    smp = reader.read_samples(slice(0, 16))
    assert smp["key"][9] == batch["keys"][9] and smp["key"][12] == "" and not smp["valid"][2] and not smp["valid"][12]
    assert list(reader.find_rows(0, [batch["keys"][4], "nope"])) == [4, -1]
    assert rl.errors() == [{"shard": 0, "row": 2, "key": batch["keys"][2], "reason": "truncated jpeg"}]
    with pytest.raises(L.StoreError, match="not done"):
        rl.read(slice(16, 18), 0)
    with pytest.raises(L.StoreError, match="padding"):
        rl.read(slice(10, 12), 0)
    with pytest.raises(L.StoreError, match="read-only"):
        rl.write_shard(1, **fake_shard(store, tiny_labeler_spec, 1))


def test_dense_labeler_round_trip(tmp_path):
    st = L.LabelStore.create(tmp_path / "d.zarr", seed=1, rows_per_chunk=4)
    st.register_shards([("x.tar", 3)])
    spec = L.LabelerSpec(name="dense", arch="a", num_classes=6, input_size=(16, 16), grid=(2, 2), mean=(0.5,) * 3,
                         std=(0.5,) * 3, view_spec=L.ViewSpec(size=(16, 16)), views=2, topk=0)
    lab = st.add_labeler(spec)
    batch = fake_shard(st, spec, 0)
    lab.write_shard(0, **batch)
    got = L.LabelStore.open(st.path).labeler("dense").read(slice(0, 3), 1)
    assert got["tokens"].dense and got["tokens"].logit.shape == (3, 4, 6) and got["cls"].logit.shape == (3, 6)
    np.testing.assert_array_equal(got["tokens"].logit, batch["tokens"].logit[:, 1])
    with pytest.raises(L.InvalidLabels, match="top-k"):
        lab.write_shard(0, **{**batch, "tokens": L.encode_topk(np.zeros((3, 2, 4, 6)), 2)})


@pytest.mark.parametrize("change, error, match", [
    (lambda b: b["tokens"].logit.__setitem__((0, 0, 0, 0), np.nan), L.InvalidLabels, "NaN/inf"),
    (lambda b: b["tokens"].cls.__setitem__((1, 0, 0, 0), 20), L.InvalidLabels, r"class ids must be in \[0, 20\)"),
    (lambda b: b["cls"].cls.__setitem__((1, 0, 1), b["cls"].cls[1, 0, 0]), L.InvalidLabels, "repeat"),
    (lambda b: b["params"].__setitem__((3, 0, 2), 500), L.InvalidLabels, "crop box"),
    (lambda b: b.__setitem__("labels", np.full(10, 0.5)), L.InvalidLabels, "labels must be integers"),
    (lambda b: b.__setitem__("params", b["params"][:, :2]), L.InvalidLabels, "params has shape"),
    (lambda b: b["keys"].__setitem__(3, b["keys"][4]), L.InvalidLabels, "duplicate key"),
])
def test_bad_writes_fail_before_anything_is_written(store, tiny_labeler_spec, change, error, match):
    batch = fake_shard(store, tiny_labeler_spec, 0)
    change(batch)
    with pytest.raises(error, match=match):
        store.labeler("tiny").write_shard(0, **batch)
    assert (np.asarray(store.samples.key[0:16]) == "").all() and store.labeler("tiny").missing_shards() == [0, 1, 2]
    assert not list((Path(store.path) / "labelers/tiny/tokens/topk_logit").rglob("c/*"))


def test_capacity_and_conflicts(store, tiny_labeler_spec):
    lab = store.labeler("tiny")
    with pytest.raises(L.ShardCapacityError, match="registered with 5"):
        lab.write_shard(1, **fake_shard(store, tiny_labeler_spec, 1, n=6))
    first = fake_shard(store, tiny_labeler_spec, 1)
    lab.write_shard(1, **first)
    lab.write_shard(1, **fake_shard(store, tiny_labeler_spec, 1, seed=5))  # same keys: a relabel, allowed
    other = fake_shard(store, tiny_labeler_spec, 1)
    other["keys"] = [k + "x" for k in other["keys"]]
    with pytest.raises(L.ShardConflict, match="differ"):
        lab.write_shard(1, **other)
    with pytest.raises(L.ShardConflict):
        lab.write_shard(1, **fake_shard(store, tiny_labeler_spec, 1, n=4))
    assert lab.done_mask().tolist() == [False, True, False]


def test_schema_mismatch_has_a_readable_diff(store, tiny_labeler_spec, tmp_path):
    wrong = dataclasses.replace(tiny_labeler_spec, grid=(2, 8), num_classes=1000)
    with pytest.raises(L.SchemaMismatch) as e:
        L.LabelStore.open(store.path).labeler("tiny", expect=wrong)
    assert "grid: store has [4, 4], expected [2, 8]" in str(e.value)
    assert "num_classes: store has 20, expected 1000" in str(e.value)
    with pytest.raises(L.SchemaMismatch, match="view_spec.scale"):
        store.add_labeler(dataclasses.replace(tiny_labeler_spec,
                                              view_spec=L.ViewSpec(size=(32, 32), scale=(0.5, 1.0))))
    with pytest.raises(L.StoreError, match="no labeler 'other'"):
        store.labeler("other")
    zarr.open_group(store.path, mode="r+").attrs["schema_version"] = 99
    with pytest.raises(L.SchemaMismatch, match="schema_version 99"):
        L.LabelStore.open(store.path)
    with pytest.raises(L.StoreError, match="no label store"):
        L.LabelStore.open(tmp_path / "nothing.zarr")
    with pytest.raises(L.StoreError, match="already exists"):
        L.LabelStore.create(store.path, seed=7)


def test_create_exist_ok_checks_settings(tmp_path):
    L.LabelStore.create(tmp_path / "s.zarr", seed=3, rows_per_chunk=16)
    assert L.LabelStore.create(tmp_path / "s.zarr", seed=3, rows_per_chunk=16, exist_ok=True).seed == 3
    with pytest.raises(L.SchemaMismatch, match="seed: store has 3, expected 4"):
        L.LabelStore.create(tmp_path / "s.zarr", seed=4, rows_per_chunk=16, exist_ok=True)


WRITER = textwrap.dedent("""
    import sys, os, numpy as np
    sys.path.insert(0, {tests!r})
    import labelstore as L
    from labelstore import labeler_store
    from conftest import fake_shard
    path, shards, mode = {path!r}, {shards!r}, {mode!r}
    st = L.LabelStore.open(path, mode="r+")
    lab = st.labeler("tiny")
    if mode == "die_before_done":  # simulate a kill between the data and the done flag
        real = labeler_store.LabelerStore.array
        class DoneGuard:
            def __init__(self, arr): self.arr = arr
            def __getitem__(self, i): return self.arr[i]
            def __setitem__(self, i, v):
                if v == 1: os._exit(3)
                self.arr[i] = v
        labeler_store.LabelerStore.array = lambda self, p: DoneGuard(real(self, p)) if p == "done" else real(self, p)
    for i in shards:
        lab.write_shard(i, **fake_shard(st, lab.spec, i, seed={seed}))
    print("ok")
""")


def run_writer(path, shards, mode="normal", seed=0, wait=True):
    code = WRITER.format(tests=str(Path(__file__).parent), path=str(path), shards=shards, mode=mode, seed=seed)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.communicate(timeout=120) + (proc.returncode,) if wait else proc


@pytest.mark.timeout(180)
def test_two_processes_write_different_shards_at_once(store, tiny_labeler_spec):
    procs = [run_writer(store.path, [0, 2], wait=False), run_writer(store.path, [1], wait=False)]
    for p in procs:
        out, err = p.communicate(timeout=150)
        assert p.returncode == 0, err
    lab = L.LabelStore.open(store.path).labeler("tiny")
    assert lab.missing_shards() == []
    for i in range(3):
        info = store.shard(i)
        want = fake_shard(store, tiny_labeler_spec, i)
        got = lab.read(info.rows, 2)
        np.testing.assert_array_equal(got["tokens"].cls, want["tokens"].cls[:, 2])
        np.testing.assert_array_equal(got["params"], want["params"][:, 2])
    assert L.verify_store(store.path) == []


@pytest.mark.timeout(180)
def test_killed_writer_leaves_shard_missing_and_it_is_rewritten_cleanly(store, tiny_labeler_spec):
    out, err, code = run_writer(store.path, [1], mode="die_before_done", seed=3)
    assert code == 3, err
    lab = L.LabelStore.open(store.path).labeler("tiny")
    assert lab.missing_shards() == [0, 1, 2]
    assert np.asarray(L.LabelStore.open(store.path).samples.key[16:21]).tolist()[0] != ""  # data did land
    with pytest.raises(L.StoreError, match="not done"):
        lab.read(slice(16, 21), 0)
    out, err, code = run_writer(store.path, [1], seed=4)
    assert code == 0, err
    lab = L.LabelStore.open(store.path).labeler("tiny")
    assert lab.missing_shards() == [0, 2]
    want = fake_shard(store, tiny_labeler_spec, 1, seed=4)
    np.testing.assert_array_equal(lab.read(slice(16, 21), 0)["tokens"].logit, want["tokens"].logit[:, 0])
    assert L.verify_store(store.path) == []


def test_verify_finds_corruption(store, tiny_labeler_spec):
    lab = store.labeler("tiny")
    lab.write_shard(0, **fake_shard(store, tiny_labeler_spec, 0))
    assert L.verify_store(store.path) == []
    raw = zarr.open_group(store.path, mode="r+")["labelers/tiny"]
    logit = raw["tokens/topk_logit"][0:8]
    logit[3, 1, 2, 0] = np.inf
    raw["tokens/topk_logit"][0:8] = logit
    cls = raw["cls/topk_class"][0:8]
    cls[5, 0, 0] = 25
    raw["cls/topk_class"][0:8] = cls
    params = raw["views/params"][0:8]
    params[6, 2, 5] = 300.0  # rotate far beyond the ViewSpec's range
    raw["views/params"][0:8] = params
    raw["done"][1] = 1  # done without data
    problems = "\n".join(L.verify_store(store.path))
    assert "tokens/topk_logit: NaN/inf at rows [3]" in problems
    assert "cls/topk_class: class id outside [0, 20) at rows [5]" in problems
    assert "shard 1 (b.tar): marked done but its sample rows are empty" in problems
    assert "views/params: rotate outside ±60 at rows [6]" in problems
    assert L.verify_store(store.path, labeler="nope") == ["no labeler 'nope' in store (has ['tiny'])"]
