"""labelstore's one row index: lookup by `__key__` inside a shard's row range of a real (tiny) label store."""
import pickle

import pytest

from labelstore import LabelStore, MissingRow, RowIndex, SchemaMismatch
from labelstore.row_index import match_urls


@pytest.fixture()
def store(tmp_path):
    st = LabelStore.create(str(tmp_path / "l.zarr"), seed=0, rows_per_chunk=4)
    st.register_shards([("/data/a/train-0.tar", 3), ("/data/a/train-1.tar", 5)])
    g = st.samples
    g.key[0:3] = ["a0", "a1", "a2"]
    g.key[4:9] = ["b0", "b1", "b2", "b3", "b4"]
    g.valid[0:3] = [True, False, True]
    g.valid[4:9] = True
    g.label[4:9] = [0, 1, 2, 3, 4]
    return LabelStore.open(st.path)


def test_rows_by_key_within_the_shard_range(store):
    idx = RowIndex(store, ["/data/a/train-0.tar", "/data/a/train-1.tar"])
    a = idx.shard_rows("/data/a/train-0.tar")
    b = idx.shard_rows("/data/a/train-1.tar")
    assert [a.row(k) for k in ("a0", "a2")] == [0, 2] and (a.first_row, a.stop, b.first_row, b.stop) == (0, 3, 4, 9)
    assert [b.row(f"b{i}") for i in range(5)] == [4, 5, 6, 7, 8] and b.label(7) == 3
    assert not a.is_valid(1) and a.is_valid(2)
    with pytest.raises(MissingRow, match=r"'b0'.*train-0.tar.*shards differ"):
        a.row("b0")  # a key of another shard is not in this shard's range
    assert isinstance(pickle.loads(pickle.dumps(idx)).shard_rows("/data/a/train-1.tar").keys, dict)


def test_urls_match_exactly_or_by_unique_file_name(store):
    urls = [s.url for s in store.shards]
    assert match_urls(["/data/a/train-1.tar"], urls) == {"/data/a/train-1.tar": 1}
    assert match_urls(["/mnt/copy/train-0.tar"], urls) == {"/mnt/copy/train-0.tar": 0}
    with pytest.raises(SchemaMismatch, match="'/x/train-9.tar'.*another shard list"):
        match_urls(["/x/train-9.tar"], urls)
    with pytest.raises(SchemaMismatch, match="train-0.tar"):
        match_urls(["/mnt/train-0.tar"], ["/a/train-0.tar", "/b/train-0.tar"])  # ambiguous file name
    idx = RowIndex(store, ["/mnt/copy/train-1.tar"])
    assert idx.shard_rows("/mnt/copy/train-1.tar").row("b2") == 6


def test_find_rows_and_the_trainer_share_one_index(store):
    idx = store.row_index(["/data/a/train-1.tar"])
    assert isinstance(idx, RowIndex)
    assert store.find_rows(1, ["b3", "a0", "nope"]).tolist() == [7, -1, -1]  # only inside shard 1's range
    assert idx.shard_rows("/data/a/train-1.tar") is store.shard_rows(1)  # one cache, read once
