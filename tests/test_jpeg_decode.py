"""labeler.jpeg_decode: the same pixels as labelstore.decode_image, with torchvision for plain JPEGs."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

import labeler.jpeg_decode as jd
from labelstore import ImageDecodeError, decode_image

skdata = pytest.importorskip("skimage.data")


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photos() -> dict[str, bytes]:
    """Real photos in the layouts a dataset holds."""
    rgb = Image.fromarray(skdata.astronaut()[::2, ::2].copy())
    odd = Image.fromarray(skdata.chelsea()[3:300, 5:421].copy())  # 297 x 416: partial MCUs
    out = {f"{name} q{q} sub{sub}{' prog' if prog else ''}": _encode(img, quality=q, subsampling=sub, progressive=prog)
           for name, img in (("astronaut", rgb), ("chelsea", odd))
           for q, sub, prog in ((95, 0, False), (75, 1, False), (85, 2, False), (85, 2, True))}
    out["camera grey"] = _encode(Image.fromarray(skdata.camera()[::2, ::2].copy()), quality=90)
    out["coffee restart markers"] = _encode(Image.fromarray(skdata.coffee()), quality=80, restart_marker_rows=2)
    return out


@pytest.fixture(autouse=True)
def _fresh_probe():
    jd._fast_decoder.cache_clear()
    yield
    jd._fast_decoder.cache_clear()


def test_the_fast_decoder_is_in_use_here_and_gives_pillows_pixels_exactly():
    assert jd.fast_jpeg_decoder_in_use(), "torchvision's decoder failed the probe against Pillow"
    for label, data in _photos().items():
        got = jd.decode_rgb(data, label)
        assert got.dtype == np.uint8 and got.flags.c_contiguous, label
        np.testing.assert_array_equal(got, np.asarray(decode_image(data, label)), err_msg=label)


def test_plain_jpegs_take_the_fast_decoder_and_everything_else_pillow(monkeypatch):
    calls = []
    fast = jd._fast_decoder()
    monkeypatch.setattr(jd, "_fast_decoder", lambda: (lambda data: calls.append(data) or fast(data)))
    photo = skdata.coffee()[::4, ::4].copy()
    plain = _encode(Image.fromarray(photo), quality=90)
    grey = _encode(Image.fromarray(photo[:, :, 1]), quality=90)
    cmyk = _encode(Image.fromarray(photo).convert("CMYK"), quality=90)
    png = _encode(Image.fromarray(photo), "PNG")
    for data in (plain, grey, cmyk, png):
        np.testing.assert_array_equal(jd.decode_rgb(data), np.asarray(decode_image(data)))
    assert calls == [plain, grey]


def test_a_jpeg_torchvision_refuses_gets_pillows_error_with_its_name():
    data = _encode(Image.fromarray(skdata.astronaut()[::4, ::4].copy()), quality=90)
    with pytest.raises(ImageDecodeError, match=r"shard-000001\.tar:k0007\.jpg: .*truncated"):
        jd.decode_rgb(data[: len(data) // 2], "shard-000001.tar:k0007.jpg")
    with pytest.raises(ImageDecodeError, match="k0008.jpg"):
        jd.decode_rgb(b"\xff\xd8" + b"x" * 64, "k0008.jpg")


def test_a_corrupt_but_decodable_jpeg_gives_pillows_pixels():
    data = _encode(Image.fromarray(skdata.chelsea()), quality=90)
    damaged = data[:4000] + bytes(600) + data[4600:]  # zeros inside the entropy-coded scan
    np.testing.assert_array_equal(jd.decode_rgb(damaged, "damaged.jpg"), np.asarray(decode_image(damaged)))


def _patch_torchvision(monkeypatch, decode_jpeg):
    import torchvision.io
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)


def test_a_decoder_whose_pixels_differ_on_a_probe_is_not_used(monkeypatch, caplog):
    import torchvision.io
    real = torchvision.io.decode_jpeg
    _patch_torchvision(monkeypatch, lambda data, mode: real(data, mode=mode) ^ 1)  # one bit off everywhere
    with caplog.at_level(logging.WARNING, logger="labeler.jpeg_decode"):
        assert not jd.fast_jpeg_decoder_in_use()
    assert "differ from Pillow's on the probe 37x53 4:4:4" in caplog.text
    data = _encode(Image.fromarray(skdata.astronaut()[::4, ::4].copy()), quality=90)
    np.testing.assert_array_equal(jd.decode_rgb(data), np.asarray(decode_image(data)))


def test_a_decoder_that_fails_a_probe_is_not_used(monkeypatch, caplog):
    def broken(data, mode):
        raise RuntimeError("no libjpeg")
    _patch_torchvision(monkeypatch, broken)
    with caplog.at_level(logging.WARNING, logger="labeler.jpeg_decode"):
        assert jd._fast_decoder() is None
    assert "failed on the probe" in caplog.text and "no libjpeg" in caplog.text


def test_the_probes_cover_every_layout():
    labels = [label for label, _ in jd.probe_jpegs()]
    for layout in ("4:4:4", "4:2:2", "4:2:0", "4:2:0 progressive", "grey"):
        assert any(label.endswith(layout) for label in labels), layout
    for label, data in jd.probe_jpegs():
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.mode == ("L" if label.endswith("grey") else "RGB")


def test_plain_jpeg_hw_reads_the_size_of_rgb_and_grey_jpegs_only():
    photo = skdata.coffee()[:101, :203].copy()
    assert jd.plain_jpeg_hw(_encode(Image.fromarray(photo), quality=90)) == (101, 203)
    assert jd.plain_jpeg_hw(_encode(Image.fromarray(photo[:, :, 0]), quality=90)) == (101, 203)
    for other in (_encode(Image.fromarray(photo).convert("CMYK"), quality=90), _encode(Image.fromarray(photo), "PNG"),
                  b"\xff\xd8 not a jpeg", b""):
        assert jd.plain_jpeg_hw(other) is None
