"""labelstore.shard_format: every tar member in order, bad samples kept, truncated tars detected."""
from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from labelstore.shard_format import (
    ShardReadError, base_plus_ext, count_samples, expand_shard_urls, image_field, iter_shard, iter_tar_members,
    parse_label,
)


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


def test_label_fields_follow_the_contract():
    # the trainer's stages and the labeler both read labels through parse_label
    assert parse_label({"cls": b" 7\n"}, "k") == (7, None)
    assert parse_label({"json": b'{"label": 4}'}, "k") == (4, None) and parse_label({"json": b"12"}, "k") == (12, None)
    assert parse_label({"json": b'{"class_id": 5, "x": true}'}, "k") == (5, None)
    assert parse_label({"cls": b"x"}, "k7")[0] == -1 and "k7" in parse_label({"cls": b"x"}, "k7")[1]
    assert parse_label({}, "k") == (-1, None) and parse_label({"cls": memoryview(b"2")}, "k") == (2, None)
    assert image_field({"png": b"", "jpg": b""}) == "jpg" and image_field({"cls": b"1"}) is None


def test_naming_and_expansion_agree_with_webdataset(monkeypatch):
    # restated here because webdataset loads torch; the trainer streams with webdataset's own rules
    for name in ("a/b.c.jpg", "x.JPG", "noext", "dir.d/k.cls", "d/.hidden", "k.tar.gz"):
        assert base_plus_ext(name) == wds.tariterators.base_plus_ext(name), name
    monkeypatch.setenv("WDS_ROOT", "/data")
    for pattern in ("${ROOT}/s-{000..002}.tar", "a-{0..1}.tar::b-{5..6}.tar", "plain.tar"):
        assert expand_shard_urls(pattern) == wds.shardlists.expand_urls(pattern), pattern


def test_an_empty_shard_list_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"\[\].*names no shard"):
        expand_shard_urls([])
    with pytest.raises(ValueError, match="''"):
        expand_shard_urls("")


def test_pipe_urls_stream_a_command_and_check_its_status(shard, tmp_path):
    assert [s.key for s in iter_shard(f"pipe:cat {shard}")][:2] == ["a/k0", "k1"]
    assert count_samples(f"pipe:cat {shard}") == 6
    with pytest.raises(ShardReadError, match="pipe:cat"):
        count_samples(f"pipe:cat {tmp_path / 'missing.tar'}")
    with pytest.raises(ShardReadError, match="status 3"):
        count_samples(f"pipe:cat {shard}; exit 3")


def test_counting_a_local_shard_reads_headers_only(tmp_path):
    # stage-1 training sizes its schedule by counting every shard: a local one is counted by seeking
    # from header to header, never reading member data (the end-of-archive check still runs)
    path = tmp_path / "big.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "jpg": bytes(range(256)) * 4096, "cls": i})

    class CountingReader(io.BytesIO):
        bytes_read = 0

        def read(self, n=-1):
            data = super().read(n)
            CountingReader.bytes_read += len(data)
            return data

    members = list(iter_tar_members(CountingReader(path.read_bytes()), str(path), read_data=False))
    assert len(members) == 8 and CountingReader.bytes_read < path.stat().st_size // 20
    assert count_samples(str(path)) == 4
