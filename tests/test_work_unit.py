"""The work unit in-process (no Ray): batched renderer vs the Pillow path, the padded last batch, the decode
pool, and the bench helpers (shards of real-looking JPEGs, the nvJPEG comparison run on CPU)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from labeler.bench_shards import make_bench_shards
from labeler.decode_pool import BackgroundIter, default_decode_threads, ordered_prefetch, resolve_decode_threads
from labeler.teacher_spec import build_labeler_spec, open_labeler_store
from labeler.work_unit import ShardLabeler, WorkerSettings, build_teacher
from labelstore import LabelStore, decode_image
from labelstore.shard_format import count_samples, iter_shard

MODEL = "fan_test_p4_hybrid_token"
VIEWS = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_bench_shards(tmp_path_factory.mktemp("bench"), shards=2, per_shard=5, min_size=40, max_size=90,
                             num_classes=10)


def labelled(tmp_path, shard_paths, name="t", **settings):
    """Label `shard_paths` into a fresh store with `settings`; returns (store path, per-shard dumped views)."""
    torch.manual_seed(0)
    spec = build_labeler_spec(name=name, model=MODEL, num_classes=10, views=VIEWS, topk=4)
    store, _ = open_labeler_store(str(tmp_path / "l.zarr"), seed=3, rows_per_chunk=8, spec=spec)
    store.register_shards([(p, count_samples(p)) for p in shard_paths])
    dump = tmp_path / "views"
    teacher = settings.pop("teacher", None)
    base = dict(checkpoint=None, batch_size=6, amp="none", device="cpu", decode_threads=2, dump_views_dir=str(dump))
    work = ShardLabeler(store.path, name, WorkerSettings(**{**base, **settings}), teacher=teacher)
    for i in range(len(shard_paths)):
        outcome = work(i)
        assert outcome.ok, outcome.error
    return store.path, [np.load(dump / f"shard-{i:06d}.npy") for i in range(len(shard_paths))], work


def read_labels(path: str) -> dict:
    lab = LabelStore.open(path).labeler("t")
    return {p: np.asarray(lab.array(p)[:]) for p in lab.array_paths if p != "done"}


@pytest.mark.timeout(300)
def test_batched_renderer_labels_like_the_pillow_path(shards, tmp_path):
    torch_store, torch_views, work = labelled(tmp_path / "a", shards, render_backend="torch")
    pil_store, pil_views, _ = labelled(tmp_path / "b", shards, render_backend="pillow")
    assert work.render_backend == "torch" and work.views_per_batch == 6
    for a, b in zip(torch_views, pil_views):
        d = np.abs(a.astype(int) - b)
        assert d.max() <= 1 and d.mean() <= 0.01, (d.mean(), d.max())
    got, want = read_labels(torch_store), read_labels(pil_store)
    assert set(got) == set(want)
    for name in got:
        if "logit" in name or "tail" in name:  # views within 1 grey level: logits nearly equal
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=0.05)
        elif "class" not in name:  # params, keys, validity: identical
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in [n for n in got if "class" in n]:  # top-k ids: the first is robust to a 1-level difference
        assert (got[name][..., 0] == want[name][..., 0]).mean() > 0.95


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["torch", "pillow"])
def test_last_batch_is_padded_to_the_fixed_shape(shards, tmp_path, backend):
    """5 images, 2 per batch: the third batch holds 1 image padded to 2; its padding is dropped and the
    results equal a run with one image per batch (nothing padded)."""
    spec = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=VIEWS, topk=4)
    torch.manual_seed(0)
    teacher = build_teacher(spec, WorkerSettings(checkpoint=None, amp="none"), torch.device("cpu"))
    shapes = []
    forward = teacher.forward
    teacher.forward = lambda views: (shapes.append(tuple(views.shape)), forward(views))[1]
    padded_store, _, _ = labelled(tmp_path / "p", shards[:1], render_backend=backend, teacher=teacher)
    assert shapes == [(6, 3, 64, 64)] * 3
    shapes.clear()
    single_store, _, _ = labelled(tmp_path / "s", shards[:1], render_backend=backend, teacher=teacher, batch_size=3)
    assert shapes == [(3, 3, 64, 64)] * 5
    got, want = read_labels(padded_store), read_labels(single_store)
    for name in got:
        if got[name].dtype.kind in "fiub":
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=2e-3,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_decode_pool_keeps_order_and_uses_its_threads():
    seen = set()

    def work(i):
        seen.add(threading.current_thread().name)
        return i * i

    assert list(ordered_prefetch(work, range(40), threads=3, depth=6)) == [i * i for i in range(40)]
    assert seen and all(name.startswith("stl-decode") for name in seen)
    assert resolve_decode_threads(0) == default_decode_threads() >= 1 and resolve_decode_threads(5) == 5
    with pytest.raises(ValueError, match="decode_threads"):
        resolve_decode_threads(-1)
    with pytest.raises(ValueError, match="decode_threads"):
        WorkerSettings(checkpoint=None, decode_threads=-2)
    with pytest.raises(ValueError, match="compile"):
        WorkerSettings(checkpoint=None, compile="maybe")


def test_background_iter_hands_over_items_errors_and_stops_on_close():
    assert list(BackgroundIter(iter(range(7)), depth=2)) == list(range(7))

    def failing():
        yield 1
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        list(BackgroundIter(failing()))
    produced = []

    def endless():
        while True:
            produced.append(1)
            yield len(produced)

    it = BackgroundIter(endless(), depth=2)
    assert next(iter(it)) == 1
    it.close()  # returns: the producer stopped although the generator never ends
    assert len(produced) <= 5


def test_bench_shards_are_jpegs_in_the_size_range(shards, tmp_path):
    assert [count_samples(p) for p in shards] == [5, 5]
    for sample in iter_shard(shards[0]):
        img = decode_image(sample.image)
        assert sample.image_ext == "jpg" and 40 <= img.height <= 90 and 40 <= img.width <= 90
        assert 0 <= sample.label < 10
    again = make_bench_shards(tmp_path / "again", shards=1, per_shard=5, min_size=40, max_size=90, num_classes=10)
    assert open(again[0], "rb").read()[512:] != b"" and [s.key for s in iter_shard(again[0])] == \
        [s.key for s in iter_shard(shards[0])]
    with pytest.raises(ValueError, match="min-size"):
        make_bench_shards(tmp_path / "bad", min_size=700, max_size=640)


@pytest.mark.timeout(120)
def test_bench_jpeg_compares_decoders_on_cpu(shards):
    from labeler.bench_jpeg import bench_jpeg

    report = bench_jpeg(shards, MODEL, num_classes=10, views=2, limit=6, batch_images=4, device="cpu", amp="none")
    assert report.images == 6 and report.skipped == 0
    assert 0 <= report.mean_abs <= report.max_abs and 0 <= report.cls_top1_agree <= 1
    text = report.format()
    assert "mean |Δ|" in text and "top-1 agreement" in text
