"""The shared decode path: every mode becomes the same 8-bit RGB; bad bytes name the sample."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import labelstore as L
from labelstore.images import DEFAULT_FILL


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def test_rgb_and_grey_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    out = L.decode_image(encode(Image.fromarray(rgb)), "a.png")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), rgb)
    grey = np.arange(63, dtype=np.uint8).reshape(9, 7)
    out = np.asarray(L.decode_image(encode(Image.fromarray(grey, "L"))))
    assert np.array_equal(out, np.repeat(grey[..., None], 3, -1))


def test_alpha_is_composited_on_fill():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    out = np.asarray(L.decode_image(encode(Image.fromarray(rgba, "RGBA"))))
    assert (out[:2] == (200, 0, 0)).all() and (out[2:] == DEFAULT_FILL).all()
    la = Image.fromarray(np.dstack([np.full((2, 2), 50, np.uint8), np.zeros((2, 2), np.uint8)]), "LA")
    assert (np.asarray(L.to_rgb(la)) == DEFAULT_FILL).all()
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60])
    pal.info["transparency"] = 1
    assert np.asarray(L.decode_image(encode(pal))).tolist() == [[[10, 20, 30], list(DEFAULT_FILL)]]


def test_sixteen_bit_and_cmyk():
    v = np.array([[0, 257, 65535, 32896]], np.uint16)
    img16 = Image.fromarray(v)
    assert img16.mode.startswith("I;16")
    out = np.asarray(L.decode_image(encode(img16), "deep.png"))
    assert out[..., 0].tolist() == [[0, 1, 255, 128]] and out.shape == (1, 4, 3)
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(L.decode_image(encode(cmyk, "JPEG", quality=100)))
    assert out.shape == (2, 3, 3) and out[..., 0].min() > 240 and out[..., 1:].max() < 15


def test_arrays_are_accepted():
    a = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(L.to_rgb(a)), a)
    assert np.asarray(L.to_rgb(a[..., 0])).shape == (5, 6, 3)
    with pytest.raises(TypeError, match="uint8"):
        L.to_rgb(a.astype(np.float32))


def test_bad_bytes_raise_naming_the_sample():
    with pytest.raises(L.ImageDecodeError, match="shard-000001.tar:k7.jpg"):
        L.decode_image(b"not an image", "shard-000001.tar:k7.jpg")
    jpeg = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(L.ImageDecodeError, match="k8"):
        L.decode_image(jpeg[: len(jpeg) // 2], "k8")
    assert issubclass(L.ImageDecodeError, L.StoreError)
