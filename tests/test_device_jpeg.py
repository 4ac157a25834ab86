"""The batch decode of `decode_device: cuda` (labeler/device_jpeg.py), run here with torchvision's CPU JPEG
decoder in nvJPEG's place: rows stay in batch order, refused JPEGs go to Pillow, undecodable ones are reported."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from labeler import device_jpeg
from labeler.device_jpeg import BatchImage, decode_on_device
from labelstore import decode_image

CPU = torch.device("cpu")


def jpeg_bytes(rng, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_a_batch_image_is_either_bytes_or_pixels():
    with pytest.raises(ValueError, match="s.tar:a.jpg.*either"):
        BatchImage((2, 2), "s.tar:a.jpg")
    with pytest.raises(ValueError, match="either"):
        BatchImage((2, 2), "s.tar:a.jpg", jpeg=b"x", pixels=np.zeros((2, 2, 3), np.uint8))


def test_jpegs_and_host_pixels_in_batch_order_padded_with_the_last():
    rng = np.random.default_rng(0)
    a, c = jpeg_bytes(rng, 20, 30), jpeg_bytes(rng, 33, 17)
    b = rng.integers(0, 256, (25, 12, 3), dtype=np.uint8)
    images = [BatchImage((20, 30), "s:a.jpg", jpeg=a), BatchImage((25, 12), "s:b.png", pixels=b),
              BatchImage((33, 17), "s:c.jpg", jpeg=c)]
    sources, failed = decode_on_device(images, CPU, batch_images=5)
    assert failed == []
    assert sources.pixels.shape[0] == 5
    assert sources.hw.tolist() == [[20, 30], [25, 12], [33, 17], [33, 17], [33, 17]]
    hwc = sources.pixels.permute(0, 2, 3, 1)
    np.testing.assert_array_equal(hwc[0, :20, :30].numpy(), np.asarray(decode_image(a, "a")))  # libjpeg as Pillow
    np.testing.assert_array_equal(hwc[1, :25, :12].numpy(), b)
    np.testing.assert_array_equal(hwc[4, :33, :17].numpy(), np.asarray(decode_image(c, "c")))


def test_refused_jpegs_go_to_pillow_and_undecodable_ones_are_reported(monkeypatch):
    rng = np.random.default_rng(1)
    good, other = jpeg_bytes(rng, 16, 16), jpeg_bytes(rng, 10, 14)
    broken = good[:200] + b"\x00" * 64  # a readable header, nothing decodable after it
    pillow = []
    real = device_jpeg.pillow_decode
    monkeypatch.setattr(device_jpeg, "pillow_decode", lambda im, dev: (pillow.append(im.name), real(im, dev))[1])
    images = [BatchImage((16, 16), "s:good.jpg", jpeg=good),
              BatchImage((16, 16), "s:broken.jpg", jpeg=broken),
              BatchImage((12, 14), "s:other.jpg", jpeg=other)]  # decodes to 10 x 14: not what its header said
    sources, failed = decode_on_device(images, CPU, batch_images=3)
    assert pillow == ["s:broken.jpg", "s:other.jpg"]
    assert [i for i, _ in failed] == [1] and "s:broken.jpg" in failed[0][1]
    assert sources.hw.tolist() == [[16, 16], [16, 16], [10, 14]]  # the blank keeps its header's size
    assert int(sources.pixels[1].max()) == 0


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="at least one image"):
        decode_on_device([], CPU, batch_images=2)
