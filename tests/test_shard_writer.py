"""labelstore.shard_writer: ImageFolder (or jpg+cls shards) → WebDataset shards with stable keys."""
from __future__ import annotations

import io

import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from labelstore.shard_format import iter_shard
from labelstore.shard_writer import scan_image_folder, shard_dataset


def image_bytes(fmt: str, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), (value, 0, 0)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    files = {"cat/c1.jpg": "JPEG", "cat/c.2.JPEG": "JPEG", "cat/sub/c3.png": "PNG",
             "dog/d1.webp": "WEBP", "dog/d2.jpg": "JPEG", "bird/b1.png": "PNG"}
    for i, (rel, fmt) in enumerate(files.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(image_bytes(fmt, i * 20))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def read_all(paths):
    return [(s.key, s.label, s.image_ext, s.image) for p in paths for s in iter_shard(p)]


def test_image_folder_to_shards(folder, tmp_path):
    report = shard_dataset(str(folder), str(tmp_path / "out" / "train-%06d.tar"), samples_per_shard=4, shuffle_seed=None)
    assert report.classes == ["bird", "cat", "dog"] and report.num_samples == 6
    assert [p.rsplit("/", 1)[1] for p in report.shards] == ["train-000000.tar", "train-000001.tar"]
    assert (tmp_path / "out" / "classes.txt").read_text() == "bird\ncat\ndog\n"
    assert len(report.skipped) == 1 and "notes.txt" in report.skipped[0]
    rows = read_all(report.shards)
    assert [(k, c, e) for k, c, e, _ in rows] == [
        ("bird/b1", 0, "png"), ("cat/c1", 1, "jpg"), ("cat/c_2", 1, "jpg"), ("cat/sub/c3", 1, "png"),
        ("dog/d1", 2, "webp"), ("dog/d2", 2, "jpg")]
    assert rows[1][3] == (folder / "cat/c1.jpg").read_bytes()  # bytes copied, not re-encoded
    assert not list((tmp_path / "out").glob("*.partial"))


def test_members_carry_no_pax_header(folder, tmp_path):
    """Plain ustar members: a per-member pax header (what a float mtime makes tarfile write) costs a header block
    pair per member and a slower read."""
    import tarfile

    report = shard_dataset(str(folder), str(tmp_path / "out" / "train-%06d.tar"), samples_per_shard=4, shuffle_seed=None)
    with tarfile.open(report.shards[0]) as tar:
        members = tar.getmembers()
    assert members and all(m.pax_headers == {} for m in members)
    assert all(isinstance(m.mtime, int) and m.mtime > 0 for m in members)


def test_shuffled_keys_are_stable(folder, tmp_path):
    a = shard_dataset(str(folder), str(tmp_path / "a-%03d.tar"), 10, shuffle_seed=3)
    b = shard_dataset(str(folder), str(tmp_path / "b-%03d.tar"), 10, shuffle_seed=3)
    rows_a, rows_b = read_all(a.shards), read_all(b.shards)
    assert rows_a == rows_b and sorted(r[0] for r in rows_a) == [r[0] for r in read_all(
        shard_dataset(str(folder), str(tmp_path / "c-%03d.tar"), 10, shuffle_seed=None).shards)]


def test_reshard_existing_jpg_cls_layout(tmp_path):
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"in-{s}.tar")) as w:
            for i in range(3):
                w.write({"__key__": f"n0_{s}{i}", "jpg": image_bytes("JPEG", i), "cls": s * 10 + i})
            if s == 1:
                w.write({"__key__": "broken", "txt": b"x"})
    report = shard_dataset(str(tmp_path / "in-{0..1}.tar"), str(tmp_path / "out-%02d.tar"), 5, shuffle_seed=None)
    rows = read_all(report.shards)
    assert [(k, c) for k, c, _, _ in rows] == [("n0_00", 0), ("n0_01", 1), ("n0_02", 2), ("n0_10", 10), ("n0_11", 11), ("n0_12", 12)]
    assert len(report.shards) == 2 and len(report.skipped) == 1 and "broken" in report.skipped[0]


def test_bad_inputs_are_clear_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="%-index"):
        shard_dataset(str(folder), str(tmp_path / "out.tar"), 4)
    with pytest.raises(ValueError, match="samples-per-shard"):
        shard_dataset(str(folder), str(tmp_path / "o-%d.tar"), 0)
    (folder / "cat" / "c1.png").write_bytes(image_bytes("PNG", 1))
    with pytest.raises(ValueError, match="same key 'cat/c1'"):
        scan_image_folder(folder)


def test_cli_shard_command(folder, tmp_path):
    from pipelines.cli_labels import app

    result = CliRunner().invoke(app, ["shard", str(folder), str(tmp_path / "cli-%04d.tar"), "--samples-per-shard", "3"])
    assert result.exit_code == 0, result.output
    assert "6 samples" in result.stdout and "2 shards" in result.stdout and "notes.txt" in result.output
