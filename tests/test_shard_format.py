"""pipelines.shard_reader: every tar member in order, bad samples kept, truncated tars detected."""
from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from pipelines.shard_reader import ShardReadError, count_samples, expand_shard_urls, iter_shard


def jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value,) * 3).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def shard(tmp_path):
    path = tmp_path / "s-000000.tar"
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "a/k0", "jpg": jpeg(10), "cls": 3})
        w.write({"__key__": "k1", "png": jpeg(20), "json": json.dumps({"label": 7}).encode()})
        w.write({"__key__": "k2", "jpg": b"not an image", "cls": 1})  # undecodable: still a row
        w.write({"__key__": "k3", "txt": b"no image here"})
        w.write({"__key__": "k4", "webp": jpeg(30)})  # no label: -1
        w.write({"__key__": "k5", "jpg": jpeg(40), "cls": b"abc"})
    return path


def test_every_sample_in_order_with_reasons(shard):
    samples = list(iter_shard(str(shard)))
    assert [s.key for s in samples] == ["a/k0", "k1", "k2", "k3", "k4", "k5"]
    assert [s.label for s in samples] == [3, 7, 1, -1, -1, -1]
    assert samples[0].image == jpeg(10) and samples[0].image_ext == "jpg"
    assert samples[1].image_ext == "png" and samples[4].image_ext == "webp"
    assert samples[2].error is None and samples[2].image == b"not an image"  # decode fails later, per sample
    assert "no image member" in samples[3].error and samples[3].image is None
    assert "bad class label" in samples[5].error and "k5" in samples[5].error
    assert count_samples(str(shard)) == 6


def test_duplicate_key_is_marked(tmp_path):
    path = tmp_path / "dup.tar"
    with wds.TarWriter(str(path)) as w:
        for key in ("x", "y", "x"):
            w.write({"__key__": key, "jpg": jpeg(1)})
    samples = list(iter_shard(str(path)))
    assert [s.error is None for s in samples] == [True, True, False]
    assert "duplicate key 'x'" in samples[2].error


def _member_offsets(path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m for info in tar for m in (info.offset, info.offset_data, info.offset_data + 3)]


def test_truncated_tar_is_detected_everywhere(shard, tmp_path):
    data = shard.read_bytes()
    cut_path = tmp_path / "cut.tar"
    cuts = set(_member_offsets(shard)) | {len(data) // 2, 700}
    for cut in sorted(c for c in cuts if 0 < c < len(data) - 1024):
        cut_path.write_bytes(data[:cut])
        with pytest.raises(ShardReadError, match="cut.tar"):
            list(iter_shard(str(cut_path)))
        with pytest.raises(ShardReadError):
            count_samples(str(cut_path))


def test_garbage_after_a_member_is_detected(shard, tmp_path):
    data = bytearray(shard.read_bytes())
    offsets = _member_offsets(shard)
    data[offsets[6]:offsets[6] + 512] = b"\x07" * 512  # overwrite a header block
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match="bad.tar"):
        list(iter_shard(str(bad)))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ShardReadError, match="nope.tar"):
        list(iter_shard(str(tmp_path / "nope.tar")))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardReadError, match="empty.tar"):
        count_samples(str(tmp_path / "empty.tar"))


def test_gzipped_shard_and_its_truncation(shard, tmp_path):
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    assert [s.key for s in iter_shard(str(gz))][:2] == ["a/k0", "k1"]
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gz.read_bytes()[:-40])
    with pytest.raises(ShardReadError, match="cut.tar.gz"):
        count_samples(str(cut))


def test_brace_expansion_and_file_urls(shard, tmp_path):
    assert expand_shard_urls(str(tmp_path / "s-{000000..000002}.tar")) == [
        str(tmp_path / f"s-00000{i}.tar") for i in range(3)]
    assert expand_shard_urls(["a.tar", "a.tar", "b.tar"]) == ["a.tar", "b.tar"]
    assert count_samples(f"file://{shard}") == 6
