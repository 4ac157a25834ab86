"""The trainer's check of streamed images against their stored rows (size; fingerprint where the store has one)."""
import zlib

import numpy as np
import pytest

import trainer.source_check as source_check
from labelstore.row_index import ShardRows
from trainer.errors import ShardsChanged
from trainer.source_check import SourceCheck

N = 6


class FakeIndex:
    """One shard's stored rows, all labelled at 40 x 30; `fingerprints` None = a store without them."""

    def __init__(self, fingerprints):
        self.rows = ShardRows(shard_index=0, url="/data/a-0.tar", first_row=0, num_samples=N,
                              keys={f"k{i}": i for i in range(N)}, valid=np.ones(N, bool), labels=np.zeros(N, int),
                              fingerprints=fingerprints, image_hw=np.tile([[40, 30]], (N, 1)))

    def shard_rows(self, url):
        return self.rows


def fingerprint(data: bytes) -> int:  # the store's image_fingerprint contract: bytes -> non-zero int
    return zlib.crc32(data) + 1


def sample(i):
    return {"__url__": "/mnt/a-0.tar", "__key__": f"k{i}", "__row__": i}


@pytest.fixture
def stored_fingerprints(monkeypatch):
    monkeypatch.setattr(source_check, "image_fingerprint", fingerprint)
    fps = np.array([fingerprint(f"img{i}".encode()) for i in range(N)], np.uint64)
    fps[5] = 0  # no fingerprint recorded for this row: not checked
    return fps


def test_size_then_fingerprint_then_a_shard_that_changed(stored_fingerprints):
    check = SourceCheck(FakeIndex(stored_fingerprints))
    assert check(sample(0), b"img0", (40, 30)) is None
    assert "80x60 (h x w) but was labelled at 40x30" in check(sample(1), b"img1", (80, 60))
    assert "fingerprint" in check(sample(2), b"other bytes", (40, 30))
    assert check(sample(5), b"anything", (40, 30)) is None
    with pytest.raises(ShardsChanged, match=r"'/mnt/a-0.tar': 4 of its 6 images differ.*key 'k4'.*changed since"):
        check(sample(3), b"x", (40, 30))  # 3 of 6: not most yet
        check(sample(4), b"y", (40, 30))


def test_stores_without_fingerprints_are_checked_by_size_only(monkeypatch):
    monkeypatch.setattr(source_check, "image_fingerprint", fingerprint)
    check = SourceCheck(FakeIndex(None))
    assert check(sample(0), b"different bytes", (40, 30)) is None
    assert check(sample(1), b"img1", (41, 30)) is not None
