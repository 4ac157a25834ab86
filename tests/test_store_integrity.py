"""A store you can trust: missing/damaged chunks detected and repaired, inputs fingerprinted, shards known by
name, concurrent drivers (store lock + shard leases) label every shard exactly once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import labelstore as L
from labelstore.leases import ShardLeases
from labelstore.shard_format import expand_shard_urls, image_fingerprint
from labelstore.store_report import verify_report
from labelstore.verify import repair_store

sys.path.insert(0, str(Path(__file__).parent))
from conftest import fake_shard  # noqa: E402


@pytest.fixture
def store(tmp_path, tiny_labeler_spec):
    st = L.LabelStore.create(str(tmp_path / "labels.zarr"), seed=7, rows_per_chunk=8)
    st.register_shards([("a.tar", 10), ("b.tar", 5)])
    lab = st.add_labeler(tiny_labeler_spec)
    for i in range(2):
        batch = fake_shard(st, tiny_labeler_spec, i)
        batch["valid"][1] = False
        lab.write_shard(i, errors=[{"key": batch["keys"][1], "reason": "cannot decode"}],
                        fingerprints=np.arange(1, len(batch["keys"]) + 1) * 1000 + i, **batch)
    assert L.verify_store(st.path) == []
    return st


def chunk_file(store: L.LabelStore, array: str, unit: int = 0) -> Path:
    """The file holding write unit `unit` (rows unit*8 .. unit*8+7) of an array."""
    base = Path(store.path) / array / "c" / str(unit)
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    assert files, f"no chunk file under {base}"
    return files[0]


@pytest.mark.parametrize("array", ["labelers/tiny/tokens/topk_logit", "labelers/tiny/tokens/tail_lse",
                                   "labelers/tiny/cls/topk_logit", "labelers/tiny/tokens/topk_class",
                                   "labelers/tiny/views/params"])
def test_a_missing_chunk_is_an_error_on_read_and_a_problem_in_verify(store, array):
    chunk_file(store, array).unlink()
    reader = L.LabelStore.open(store.path)
    with pytest.raises(L.StoreError, match=rf"{array.split('/', 2)[2]}.*missing chunk.*shard 0 \(a.tar\)"):
        reader.labeler("tiny").read(slice(0, 8), 1)
    reader.labeler("tiny").read(slice(16, 21), 1)  # the other shard is intact
    problems = L.verify_store(store.path)
    assert problems and all("shard 0 (a.tar)" in p for p in problems), problems
    assert any(array.split("/", 2)[2] in p and "missing chunk" in p for p in problems), problems


@pytest.mark.parametrize("array", ["samples/valid", "samples/key", "samples/label", "labelers/tiny/errors"])
def test_a_missing_sample_chunk_is_a_problem_in_verify(store, array):
    chunk_file(store, array).unlink()
    problems = L.verify_store(store.path)
    assert problems and all("shard 0 (a.tar)" in p for p in problems), problems


def test_damaged_chunks_are_each_reported_and_repair_relabels_exactly_those(store, capsys):
    for array, unit in (("labelers/tiny/tokens/topk_logit", 0), ("samples/key", 2)):
        f = chunk_file(store, array, unit)
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated
    text, ok = verify_report(store.path)
    assert not ok and "Traceback" not in text
    problems = [line for line in text.splitlines() if line.startswith("PROBLEM")]
    assert any("shard 0 (a.tar)" in p and "tokens/topk_logit: damaged chunk" in p for p in problems), text
    assert any("shard 1 (b.tar)" in p and "samples/key: damaged chunk" in p for p in problems), text
    with pytest.raises(L.StoreError, match=r"topk_logit: damaged chunk .* shard 0 \(a.tar\)"):
        L.LabelStore.open(store.path).labeler("tiny").read(slice(0, 8), 0)

    found, cleared = repair_store(store.path)
    assert cleared == {"tiny": [0, 1]} and found
    assert L.LabelStore.open(store.path).labeler("tiny").missing_shards() == [0, 1]
    assert L.verify_store(store.path) == []  # not-done shards are not problems: generate relabels them


def test_repair_leaves_sound_shards_done(store):
    chunk_file(store, "labelers/tiny/cls/tail_lse", 2).unlink()  # shard 1 only
    text, ok = verify_report(store.path, repair=True)
    assert not ok and "marked 1 damaged shard(s) not done (1)" in text
    assert L.LabelStore.open(store.path).labeler("tiny").missing_shards() == [1]


def test_an_out_of_range_class_label_invalidates_only_its_row(tmp_path, tiny_labeler_spec):
    st = L.LabelStore.create(str(tmp_path / "l.zarr"), seed=7, rows_per_chunk=8)
    st.register_shards([("a.tar", 6)])
    lab = st.add_labeler(tiny_labeler_spec)
    batch = fake_shard(st, tiny_labeler_spec, 0)
    batch["labels"][3] = 1234
    lab.write_shard(0, **batch)
    smp = st.read_samples(slice(0, 6))
    assert smp["valid"].tolist() == [True, True, True, False, True, True] and smp["label"][3] == -1
    (err,) = lab.errors()
    assert err["key"] == batch["keys"][3] and "1234" in err["reason"] and batch["keys"][3] in err["reason"]
    assert L.verify_store(st.path) == []


def test_fingerprints_are_stored_and_changed_images_are_caught(store, tiny_labeler_spec):
    assert image_fingerprint(b"abc") == image_fingerprint(b"abc") != image_fingerprint(b"abd")
    assert image_fingerprint(b"") > 0
    assert store.read_samples(slice(16, 21))["fingerprint"].tolist() == [1001, 2001, 3001, 4001, 5001]
    rows = L.LabelStore.open(store.path).row_index(["b.tar"]).shard_rows("b.tar")  # what the trainer joins by key
    assert rows.fingerprint(rows.row(rows_key := next(iter(rows.keys)))) == 1001 and rows.hw(rows.keys[rows_key]) == (40, 50)
    lab = store.labeler("tiny")
    batch = fake_shard(store, tiny_labeler_spec, 1)
    few = np.array([1001, 2001, 3001, 4001, 77], np.uint64)  # one image changed: that row becomes invalid
    lab.write_shard(1, fingerprints=few, **batch)
    assert store.read_samples(slice(16, 21))["valid"].tolist() == [True] * 4 + [False]
    assert "changed since" in lab.errors(shards=[1])[0]["reason"]
    with pytest.raises(L.ShardConflict, match="shards changed since labelling"):
        lab.write_shard(1, fingerprints=np.arange(5) + 90, **batch)


def test_a_schema_1_store_is_read_but_not_written(store):
    root = zarr.open_group(store.path, mode="r+")
    root.attrs["schema_version"] = 1
    assert L.LabelStore.open(store.path).labelers() == ["tiny"]
    with pytest.raises(L.SchemaMismatch, match="label into a new store"):
        L.LabelStore.open(store.path, mode="r+")


def test_shards_are_known_by_name_wherever_they_are(tmp_path):
    st = L.LabelStore.create(str(tmp_path / "l.zarr"), seed=0, rows_per_chunk=4)
    st.register_shards([("/data/set/train/s-0.tar", 3, "k0", "k2"), ("/data/set/val/s-0.tar", 2, "v0", "v1")],
                       root="/data/set")
    assert [s.name for s in st.shards] == ["train/s-0.tar", "val/s-0.tar"]
    # moved, mounted elsewhere, relative, as a URL: the same shards, never registered again
    again = st.register_shards([("/mnt/team2/train/s-0.tar", 3, "k0", "k2")], root="/mnt/team2")
    assert [s.index for s in again] == [0] and len(st.shards) == 2
    got = st.match_shards(["train/s-0.tar", "s3://bucket/x/val/s-0.tar", "/data/set/train/s-0.tar"])
    assert [s.index for s in got] == [0, 1, 0]
    assert st.match_shards(["/data/set/val2/s-0.tar"], missing_ok=True, by_file_name=False) == [None]  # generate
    with pytest.raises(L.SchemaMismatch, match="several shards"):
        st.match_shards(["/elsewhere/s-0.tar"])  # the file name alone is ambiguous here
    with pytest.raises(L.SchemaMismatch, match="not in the label store"):
        st.match_shards(["train/s-9.tar"])
    with pytest.raises(L.ShardConflict, match="another file under the same name"):
        st.register_shards([("/other/train/s-0.tar", 3, "x0", "x2")], root="/other")
    assert st.row_index(["train/s-0.tar"]).shard_rows("train/s-0.tar").shard_index == 0


def test_a_glob_pattern_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="glob pattern.*brace patterns"):
        expand_shard_urls("data/*.tar")


def test_leases_expire_and_block_other_drivers(store):
    lab = store.labeler("tiny")
    lab.array("done")[0] = 0
    a, b = ShardLeases(lab, "driver-a", ttl_s=0.5), ShardLeases(lab, "driver-b", ttl_s=0.5)
    assert a.claim(0) and not b.claim(0) and not b.claim(1)  # 1 is done
    time.sleep(0.6)  # a died without renewing: its lease has expired
    assert b.claim(0) and b.holder(0) == "driver-b"
    b.release(0)
    assert b.holder(0) is None


DRIVER = Path(__file__)


def run_driver(store_path: str, log_path: str, rank: int) -> None:
    """One driver: create-or-open the store, register the shards, claim and label until nothing is left."""
    import labelstore as L
    from conftest import TINY_CLASSES  # the same tiny spec as the fixtures
    from labelstore.leases import ShardLeases

    spec = L.LabelerSpec(name="tiny", arch="fan_test_p4_hybrid_token", num_classes=TINY_CLASSES, input_size=(32, 32),
                         grid=(4, 4), mean=(0.5,) * 3, std=(0.5,) * 3, view_spec=L.ViewSpec(size=(32, 32)), views=3,
                         topk=4)
    store = L.LabelStore.create(store_path, seed=7, rows_per_chunk=8, exist_ok=True)
    store.register_shards([(f"/data/s-{i}.tar", 5 + i % 3) for i in range(8)], root="/data")
    lab = store.add_labeler(spec)
    leases = ShardLeases(lab, f"driver-{rank}")
    for i in range(len(store.shards)):
        if not leases.claim(i):
            continue
        with open(log_path, "a") as log:
            log.write(f"{i} {rank}\n")
        time.sleep(0.05)  # labelling takes a while: the other driver must skip this shard meanwhile
        lab.write_shard(i, **fake_shard(store, spec, i))
        leases.release(i)


def test_two_driver_processes_label_every_shard_exactly_once(tmp_path):
    store_path, log_path = str(tmp_path / "labels.zarr"), str(tmp_path / "log.txt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(DRIVER), store_path, log_path, str(r)], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    labelled = [line.split()[0] for line in Path(log_path).read_text().splitlines()]
    assert sorted(labelled, key=int) == [str(i) for i in range(8)]  # each shard once, none twice
    store = L.LabelStore.open(store_path)
    assert len(store.shards) == 8 and store.labeler("tiny").missing_shards() == []
    assert L.verify_store(store_path) == []


if __name__ == "__main__":  # a driver process of the test above
    run_driver(sys.argv[1], sys.argv[2], int(sys.argv[3]))
