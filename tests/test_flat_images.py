"""FlatImages: images of mixed sizes travel flat and come out on the device exactly as the padded batch."""
import numpy as np
import pytest
import torch

from labeler.flat_images import FlatImages, gather_padded, pack_flat, pad_images, upload_flat
from labeler.render_batch import SourceBatch, render_batch
from labelstore.views import ViewSpec, draw_views


def _images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_pack_flat_round_trip_and_slices():
    images = _images(0, [(5, 7), (3, 2), (9, 4)])
    flat = pack_flat(images)
    assert flat.data.numel() == sum(im.size for im in images)
    for i, im in enumerate(images):
        np.testing.assert_array_equal(flat.image(i), im)
    part = flat.slice(1, 3)
    np.testing.assert_array_equal(part.image(1), images[2])


def _padded(images, multiple=32):
    """The padded batch built by hand: each image in the top-left corner of a zero (N, 3, H, W) buffer."""
    h = -(-max(im.shape[0] for im in images) // multiple) * multiple
    w = -(-max(im.shape[1] for im in images) // multiple) * multiple
    out = np.zeros((len(images), h, w, 3), np.uint8)
    for i, im in enumerate(images):
        out[i, :im.shape[0], :im.shape[1]] = im
    return SourceBatch(torch.from_numpy(out).permute(0, 3, 1, 2), np.array([im.shape[:2] for im in images]))


def test_upload_flat_equals_padded_upload():
    images = _images(1, [(40, 33), (17, 64), (64, 10)])
    flat = upload_flat(pack_flat(images), "cpu")
    padded = _padded(images)
    assert flat.pixels.shape == padded.pixels.shape
    assert torch.equal(flat.pixels, padded.pixels)
    np.testing.assert_array_equal(flat.hw, padded.hw)


def test_upload_of_pieces_equals_upload_of_their_concatenation():
    """A forward batch made of pieces of several chunks (and a repeated padding image) uploads as the same
    padded batch as the pieces joined on the host first, with the whole images' sizes and origins."""
    a, b = pack_flat(_images(4, [(12, 9), (30, 20), (7, 40)])), pack_flat(_images(5, [(25, 25), (9, 14)]))
    pieces = [a.slice(1, 3), b.slice(0, 2), b.slice(1, 2)]
    whole = pack_flat([p.image(i) for p in pieces for i in range(len(p))])
    image_hw, origins = whole.hw + 5, np.full((len(whole), 2), 2)
    got = upload_flat(pieces, "cpu", image_hw=image_hw, origins=origins)
    want = upload_flat(whole, "cpu", image_hw=image_hw, origins=origins)
    assert torch.equal(got.pixels, want.pixels)
    for field in ("hw", "origins", "region_hw"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    with pytest.raises(ValueError, match="at least one image"):
        upload_flat([a.slice(0, 0)], "cpu")


@pytest.mark.parametrize("multiple", [1, 32])
def test_gather_padded_equals_the_per_image_copies(multiple):
    """The GPU layout (one gather from the flat bytes + a trailing zero pixel) is the CPU one, zeros included."""
    images = _images(8, [(40, 33), (17, 64), (1, 1), (64, 10), (33, 33)])
    flat = pack_flat(images)
    data = torch.cat([flat.data, torch.zeros(3, dtype=torch.uint8)])
    want = pad_images([torch.from_numpy(im) for im in images], multiple)
    got = gather_padded(data, flat.hw, multiple)
    assert got.shape == want.shape and torch.equal(got, want)
    with pytest.raises(ValueError, match="zero pixel"):
        gather_padded(flat.data, flat.hw, multiple)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pieces_upload_to_cuda_page_locked_or_not():
    a = pack_flat(_images(6, [(12, 9), (30, 20)]), pin_memory=True)
    b = pack_flat(_images(7, [(25, 25)]))  # pageable: page-locked on the way, no wait on the device
    got = upload_flat([a, b], "cuda")
    want = upload_flat([a, b], "cpu")
    torch.cuda.synchronize()
    assert torch.equal(got.pixels.cpu(), want.pixels)


def test_render_from_flat_matches_padded():
    images = _images(2, [(120, 90), (70, 150)])
    spec = ViewSpec(size=(32, 32))
    params = np.concatenate([draw_views(spec, 0, i, 3, im.shape[:2]) for i, im in enumerate(images)])
    index = np.repeat([0, 1], 3)
    a = render_batch(upload_flat(pack_flat(images), "cpu"), index, params, spec)
    b = render_batch(_padded(images), index, params, spec)
    assert torch.equal(a, b)


def test_shared_pack_survives_pickling_to_another_process():
    import torch.multiprocessing as mp

    flat = pack_flat(_images(3, [(8, 8), (4, 6)]), shared=True)
    assert flat.data.is_shared()
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    q.put(flat)
    back = q.get()
    np.testing.assert_array_equal(back.image(1), flat.image(1))


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="HWC uint8"):
        pack_flat([np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match="need 36 bytes"):
        FlatImages(torch.zeros(10, dtype=torch.uint8), np.array([[3, 4]]))
    with pytest.raises(ValueError, match="exclude"):
        pack_flat(_images(0, [(2, 2)]), pin_memory=True, shared=True)
