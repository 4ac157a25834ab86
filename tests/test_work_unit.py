"""The work unit in-process (no Ray): batched renderer vs the Pillow path, the padded last batch, the decode
workers (threads and processes), shards in flight sharing batches, and the bench helpers (shards of real-looking JPEGs, the nvJPEG comparison run on CPU)."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from labeler.bench_shards import make_bench_shards
from labeler.decode_chunks import DecodeJob, decode_chunks
from labeler.decode_workers import (DecodeFailed, DecodeWorkers, default_decode_workers, resolve_decode_pool,
                                    resolve_decode_workers)
from labeler.ordered_prefetch import ordered_prefetch
from labeler.teacher_spec import build_labeler_spec, open_labeler_store
from labeler.work_unit import ShardLabeler, build_teacher
from labeler.worker_settings import WorkerSettings, resolve_shards_in_flight
from labelstore import LabelStore, ShardCapacityError, ShardConflict, decode_image, draw_views
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
    base = dict(checkpoint=None, batch_size=6, amp="none", device="cpu", decode_workers=2, dump_views_dir=str(dump))
    with ShardLabeler(store.path, name, WorkerSettings(**{**base, **settings}), teacher=teacher) as work:
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
    forward = teacher.forward_fn  # the model call every batch goes through
    teacher.forward_fn = lambda x: (shapes.append(tuple(x.shape)), forward(x))[1]
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


def test_ordered_prefetch_keeps_order_and_uses_its_threads():
    seen = set()

    def work(i):
        seen.add(threading.current_thread().name)
        return i * i

    assert list(ordered_prefetch(work, range(40), threads=3, depth=6)) == [i * i for i in range(40)]
    assert seen and all(name.startswith("stl-decode") for name in seen)


def test_decode_settings_are_checked_by_name():
    assert resolve_decode_workers(0) == default_decode_workers() >= 1 and resolve_decode_workers(5) == 5
    assert resolve_decode_pool("auto", "cuda") == "process" and resolve_decode_pool("auto", "cpu") == "thread"
    with pytest.raises(ValueError, match="decode_workers"):
        resolve_decode_workers(-1)
    with pytest.raises(ValueError, match="decode_workers"):
        WorkerSettings(checkpoint=None, decode_workers=-2)
    with pytest.raises(ValueError, match="decode_pool"):
        WorkerSettings(checkpoint=None, decode_pool="fibers")
    with pytest.raises(ValueError, match="shards_in_flight"):
        WorkerSettings(checkpoint=None, shards_in_flight=-1)
    with pytest.raises(ValueError, match="compile"):
        WorkerSettings(checkpoint=None, compile="maybe")
    proc = WorkerSettings(checkpoint=None, decode_workers=6, decode_pool="process")
    assert resolve_shards_in_flight(proc, "cpu") == 8  # one per process + 2
    assert resolve_shards_in_flight(WorkerSettings(checkpoint=None), "cpu") == 1


def _job(url, n, mode="pixels", chunk=2, threads=1, shared=False):
    spec = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=VIEWS, topk=4)
    return DecodeJob(url=url, num_samples=n, first_row=8, store_seed=3, store_path="s.zarr", view_spec=spec.view_spec,
                     views=VIEWS, mode=mode, chunk_images=chunk, threads=threads, shared=shared)


def test_decode_chunks_account_for_every_row_in_order(shards):
    job = _job(shards[0], 5, chunk=2, threads=2)
    chunks = list(decode_chunks(job))
    assert [c.num_valid for c in chunks] == [2, 2, 1]
    assert np.concatenate([c.positions for c in chunks]).tolist() == list(range(5))
    samples = list(iter_shard(shards[0]))
    first = chunks[0]
    img = np.asarray(decode_image(samples[1].image))
    np.testing.assert_array_equal(first.pixels.image(1), img)
    np.testing.assert_array_equal(first.params[1], draw_views(job.view_spec, 3, 8 + 1, VIEWS, img.shape[:2]))
    views = list(decode_chunks(_job(shards[0], 5, mode="views", chunk=5)))[0]
    assert views.pixels.hw.tolist() == [list(job.view_spec.size)] * (5 * VIEWS)
    with pytest.raises(ShardCapacityError, match="more samples than the 4 rows"):
        list(decode_chunks(_job(shards[0], 4)))
    with pytest.raises(ShardConflict, match="has 5 samples but 6"):
        list(decode_chunks(_job(shards[0], 6)))


@pytest.mark.timeout(120)
def test_decode_processes_match_threads_and_report_errors(shards, tmp_path):
    workers = DecodeWorkers(2, "process", max_chunks_ahead=1)
    try:
        bad = tmp_path / "missing.tar"
        jobs = [workers.submit(_job(shards[i % 2], 5, shared=True)) for i in range(3)]
        failing = workers.submit(_job(str(bad), 5, shared=True))
        got = [list(j) for j in jobs]  # three shards on two processes, one chunk ahead each: no deadlock
        want = list(decode_chunks(_job(shards[0], 5)))
        for a, b in zip(got[0], want):
            np.testing.assert_array_equal(a.positions, b.positions)
            np.testing.assert_array_equal(a.params, b.params)
            assert torch.equal(a.pixels.data, b.pixels.data) and a.keys == b.keys
        with pytest.raises(DecodeFailed, match="missing.tar"):
            list(failing)
        abandoned = workers.submit(_job(shards[1], 5, chunk=1, shared=True))
        next(abandoned)
        abandoned.close()  # the rest is drained: the process takes the next job
        assert len(list(workers.submit(_job(shards[1], 5, shared=True)))) == 3
        victim = workers._procs[0]
        victim.kill()
        victim.join()
        deadline = time.monotonic() + 30
        while workers._procs[0] is victim and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers._procs[0] is not victim and workers._procs[0].is_alive()  # replaced: the pool keeps its size
        assert [c.num_valid for c in workers.submit(_job(shards[0], 5, chunk=5, shared=True))] == [5]
    finally:
        workers.close()
    assert not any(p.is_alive() for p in workers._procs)


@pytest.mark.timeout(300)
def test_shards_in_flight_share_batches_and_label_like_one_at_a_time(shards, tmp_path):
    """Two shards of 5 images, 2 images per batch: labelled concurrently their images share batches (the
    device sees 5 full batches, not 6 with two padded) and every row equals the one-at-a-time result."""
    spec = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=VIEWS, topk=4)
    torch.manual_seed(0)
    teacher = build_teacher(spec, WorkerSettings(checkpoint=None, amp="none"), torch.device("cpu"))
    one, _, _ = labelled(tmp_path / "one", shards, render_backend="torch", teacher=teacher)
    calls = []
    forward = teacher.forward_fn  # the model call every batch goes through
    teacher.forward_fn = lambda x: (calls.append(x.shape[0]), forward(x))[1]
    spec_store = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=VIEWS, topk=4)
    store, _ = open_labeler_store(str(tmp_path / "many" / "l.zarr"), seed=3, rows_per_chunk=8, spec=spec_store)
    store.register_shards([(p, count_samples(p)) for p in shards])
    settings = WorkerSettings(checkpoint=None, batch_size=6, amp="none", device="cpu", render_backend="torch",
                              decode_workers=1, shards_in_flight=2)
    with ShardLabeler(store.path, "t", settings, teacher=teacher) as work:
        outcomes = list(work.label_shards([0, 1]))
    assert [o.ok for o in outcomes] == [True, True] and [o.views for o in outcomes] == [15, 15]
    assert len(calls) == 5
    lab_one, lab_many = LabelStore.open(one).labeler("t"), LabelStore.open(store.path).labeler("t")
    for name in lab_one.array_paths:
        a, b = np.asarray(lab_one.array(name)[:]), np.asarray(lab_many.array(name)[:])
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


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


@pytest.mark.timeout(300)
def test_jpeg_mode_keeps_rows_in_place_among_pillow_decoded_images(tmp_path, monkeypatch):
    """`decode_device: cuda` sends baseline JPEG bytes and decodes the rest (PNG, CMYK) with Pillow; a batch mixes
    both. Run here with torchvision's CPU JPEG decoder (libjpeg, as Pillow's) in place of nvJPEG: every row must
    come out exactly where the all-Pillow run puts it."""
    import io
    import tarfile

    from PIL import Image

    from labeler import device_jpeg
    from labelstore.shard_writer import write_tar_sample

    rng = np.random.default_rng(0)
    shard = tmp_path / "mixed-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(7):
            img = Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60 - 3 * i, 3), dtype=np.uint8))
            buf = io.BytesIO()
            if i % 3 == 1:
                img.save(buf, format="PNG")
                ext = "png"
            elif i % 3 == 2:
                img.convert("CMYK").save(buf, format="JPEG")  # not nvJPEG-able: decoded by Pillow
                ext = "jpg"
            else:
                img.save(buf, format="JPEG", quality=90)
                ext = "jpg"
            write_tar_sample(tar, f"k{i:02d}", {ext: buf.getvalue(), "cls": str(i % 10).encode()})
        good = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(good, format="JPEG")
        header = good.getvalue()[:200]  # a valid JPEG header (its size reads fine) and then nothing decodable
        write_tar_sample(tar, "k07", {"jpg": header + b"\x00" * 64, "cls": b"1"})
    spec = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=VIEWS, topk=4)
    teacher = build_teacher(spec, WorkerSettings(checkpoint=None, amp="none"), torch.device("cpu"))
    pixels, _, _ = labelled(tmp_path / "p", [str(shard)], render_backend="torch", teacher=teacher)
    store, _ = open_labeler_store(str(tmp_path / "j" / "l.zarr"), seed=3, rows_per_chunk=8, spec=spec)
    store.register_shards([(str(shard), count_samples(str(shard)))])
    settings = WorkerSettings(checkpoint=None, batch_size=6, amp="none", device="cpu", render_backend="torch",
                              decode_workers=2)
    with ShardLabeler(store.path, "t", settings, teacher=teacher) as work:
        work.settings = dataclasses.replace(settings, decode_device="cuda")  # the jpeg path, on this CPU
        assert work.chunk_mode == "jpeg"
        fallbacks = []
        fallback = device_jpeg.pillow_decode
        monkeypatch.setattr(device_jpeg, "pillow_decode", lambda im, dev: (fallbacks.append(im.name), fallback(im, dev))[1])
        assert work(0).ok
    assert fallbacks == [f"{shard}:k07.jpg"]  # the broken JPEG went to the device decoder, which refused it
    got, want = read_labels(store.path), read_labels(pixels)
    assert not LabelStore.open(store.path).samples["valid"][7]  # the broken JPEG: invalid, with Pillow's reason
    for name in got:
        if got[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=2e-3, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.timeout(120)
def test_the_device_loop_keeps_two_batches_queued_while_it_files_the_oldest(shards, tmp_path, monkeypatch):
    """Batch n is filed only after batch n + 2 is launched (when there is one), every batch once, in order."""
    from labeler import work_unit

    events = []
    launch, collect = ShardLabeler._launch, ShardLabeler._collect

    def record_launch(self, pieces):
        if self.batches == 0:  # let the rest of the shard arrive first (until its end, or the inbox is full)
            deadline = time.monotonic() + 60
            while not (self._inbox.full() or any(m[0] == "end" for m in list(self._inbox.queue))):
                assert time.monotonic() < deadline, "the shard's other images never arrived"
                time.sleep(0.01)
        events.append(("launch", self.batches + 1))
        done = launch(self, pieces)
        done.number = self.batches
        return done

    def record_collect(self, done):
        events.append(("file", done.number))
        collect(self, done)

    monkeypatch.setattr(ShardLabeler, "_launch", record_launch)
    monkeypatch.setattr(ShardLabeler, "_collect", record_collect)
    store, _, _ = labelled(tmp_path, shards[:1], render_backend="torch", batch_size=VIEWS)  # 5 images, 1 per batch
    assert work_unit.BATCHES_QUEUED == 2
    assert [e for e in events if e[0] == "launch"] == [("launch", i) for i in range(1, 6)]
    assert [e for e in events if e[0] == "file"] == [("file", i) for i in range(1, 6)]
    for n in (1, 2, 3):  # batch n is filed after batch n + 2 was launched
        assert events.index(("file", n)) > events.index(("launch", n + 2))
    assert LabelStore.open(store).samples["valid"][:5].all()


def _warm_up_unit(tmp_path, shard_paths):
    spec = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=VIEWS, topk=4)
    store, _ = open_labeler_store(str(tmp_path / "w.zarr"), seed=3, rows_per_chunk=8, spec=spec)
    store.register_shards([(p, count_samples(p)) for p in shard_paths])
    teacher = build_teacher(spec, WorkerSettings(checkpoint=None, amp="none"), torch.device("cpu"))
    teacher.compiled = True  # as on a GPU (the warm-up itself is replaced: compiling here would take minutes)
    settings = WorkerSettings(checkpoint=None, batch_size=6, amp="none", device="cpu", render_backend="torch",
                              decode_workers=1)
    return ShardLabeler(store.path, "t", settings, teacher=teacher)


def test_the_device_loop_builds_the_compiled_render_before_start_returns(shards, tmp_path, monkeypatch):
    import labeler.work_unit as work_unit

    seen = []

    def warm_up(view_spec, views, device, compiled):
        time.sleep(0.2)  # start(wait=True) must wait for it
        seen.append((threading.current_thread().name, views, str(device), compiled))

    monkeypatch.setattr(work_unit, "warm_up_render", warm_up)
    with _warm_up_unit(tmp_path, shards) as work:
        work.start(wait=True)
        assert seen == [("stl-device-loop", VIEWS, "cpu", True)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop thread re-raises
def test_a_device_loop_that_fails_its_warm_up_is_reported_by_start(shards, tmp_path, monkeypatch):
    import labeler.work_unit as work_unit

    def warm_up(*args, **kwargs):
        raise ValueError("no compiler")

    monkeypatch.setattr(work_unit, "warm_up_render", warm_up)
    work = _warm_up_unit(tmp_path, shards)
    try:
        with pytest.raises(RuntimeError, match="device loop stopped: ValueError: no compiler"):
            work.start(wait=True)
    finally:
        work.close()
