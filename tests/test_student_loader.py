"""The student loader on a tiny store + tiny shards built here: exact view replay, bad inputs, coverage."""
import dataclasses
import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from labelstore import (LabelerSpec, LabelStore, MissingRow, SchemaMismatch, ViewSpec, decode_image, draw_views,
                        encode_topk, render)
from labeler.flat_images import FlatImages
from trainer.data_config import DataConfig
from trainer.loader import build_eval_loader, build_labeler_loader, build_student_loader, token_chunk_rows
from trainer.view_choice import choose_view

NUM_SHARDS, PER_SHARD, C, S, K, GRID, SIZE = 4, 5, 10, 3, 3, (4, 4), (32, 32)
CORRUPT = (1, 2)  # (shard, sample): bytes broken after labelling, row still valid in the store
INVALID = (2, 0)  # the labeler marked this row invalid


def _jpeg(rng, h, w):
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
    return b.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    samples, urls = {}, []
    for s in range(NUM_SHARDS):
        url = str(root / f"train-{s:06d}.tar")
        urls.append(url)
        with wds.TarWriter(url) as w:
            for i in range(PER_SHARD):
                key = f"s{s}_{i:03d}"
                img = _jpeg(rng, int(rng.integers(36, 60)), int(rng.integers(36, 60)))
                samples[key] = (img, (s * PER_SHARD + i) % C)
                data = b"broken jpeg bytes" if (s, i) == CORRUPT else img
                w.write({"__key__": key, "jpg": data, "cls": samples[key][1]})
    store = LabelStore.create(str(root / "labels.zarr"), seed=11, rows_per_chunk=8)
    infos = store.register_shards([(u, PER_SHARD) for u in urls])
    vs = ViewSpec(size=SIZE)
    lab = store.add_labeler(LabelerSpec(name="tl", arch="test", num_classes=C, input_size=SIZE, grid=GRID,
                                        mean=(0.5,) * 3, std=(0.5,) * 3, view_spec=vs, views=S, topk=K))
    dense = store.add_labeler(LabelerSpec(name="dense", arch="test", num_classes=C, input_size=SIZE, grid=GRID,
                                          mean=(0.5,) * 3, std=(0.5,) * 3, view_spec=vs, views=S, topk=0))
    for s, info in enumerate(infos):
        keys = [f"s{s}_{i:03d}" for i in range(PER_SHARD)]
        hw = np.array([decode_image(samples[k][0]).size[::-1] for k in keys], np.int32)
        params = np.stack([draw_views(vs, store.seed, info.first_row + i, S, tuple(hw[i])) for i in range(PER_SHARD)])
        tokens = encode_topk(rng.normal(size=(PER_SHARD, S, GRID[0] * GRID[1], C)).astype(np.float32), K)
        cls = encode_topk(rng.normal(size=(PER_SHARD, S, C)).astype(np.float32), K)
        valid = np.array([(s, i) != INVALID for i in range(PER_SHARD)])
        lab.write_shard(s, keys=keys, labels=[samples[k][1] for k in keys], image_hw=hw, valid=valid,
                        params=params, tokens=tokens, cls=cls)
        dense.write_shard(s, keys=keys, labels=[samples[k][1] for k in keys], image_hw=hw, valid=valid,
                          params=params, tokens=encode_topk(rng.normal(size=(PER_SHARD, S, 16, C)), 0),
                          cls=encode_topk(rng.normal(size=(PER_SHARD, S, C)), 0))
    return {"root": root, "urls": urls, "samples": samples, "store": str(root / "labels.zarr")}


def _cfg(tiny, **kw):
    base = dict(shards=tuple(tiny["urls"]), batch_size=4, workers=0, seed=5, student_augs=False, shuffle_buffer=3)
    return DataConfig(**{**base, **kw})


def _rows(batches):
    return [int(r) for b in batches for r in b["row"]]


def test_replay_equals_render_of_stored_params(tiny):
    loader = build_student_loader(_cfg(tiny), labels=tiny["store"], labeler="tl", num_classes=C)
    store = LabelStore.open(tiny["store"])
    lab = store.labeler("tl")
    spec = lab.spec.view_spec
    chunk = token_chunk_rows(lab)
    loader.set_epoch(2)
    batches = list(loader)
    log = loader.view_choices(2)
    assert sum(len(b["row"]) for b in batches) == NUM_SHARDS * PER_SHARD - 2
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, *SIZE)
        assert b["image"].is_contiguous(memory_format=torch.channels_last)
        for j, row in enumerate(b["row"].tolist()):
            key = str(store.samples.key[row])
            view = int(b["view"][j])
            assert view == choose_view(5, 2, row // chunk, S) == log["views"][row // chunk]
            stored = lab.read(slice(row, row + 1), view)
            expect = render(decode_image(tiny["samples"][key][0]), stored["params"][0], spec)
            assert np.array_equal(b["image"][j].permute(1, 2, 0).numpy(), expect), key
            assert np.array_equal(b["token_logit"][j].numpy(), stored["tokens"].logit[0])
            assert np.array_equal(b["token_class"][j].numpy(), stored["tokens"].cls[0])
            assert np.array_equal(b["token_tail"][j].numpy(), stored["tokens"].tail_lse[0])
            assert int(b["label"][j]) == tiny["samples"][key][1]


def test_corrupt_and_invalid_skipped_and_counted(tiny):
    loader = build_student_loader(_cfg(tiny), labels=tiny["store"], labeler="tl")
    loader.set_epoch(0)
    rows = _rows(loader)
    assert len(rows) == len(set(rows)) == NUM_SHARDS * PER_SHARD - 2
    assert loader.num_skipped == 2 and loader.samples_seen == len(rows)
    reasons = {s["key"]: s["reason"] for s in loader.skipped}
    assert "cannot decode" in reasons["s1_002"] and "invalid" in reasons["s2_000"]
    position = loader.position()
    assert position["done_shards"] == [0, 1, 2, 3] and position["skipped"] == 2
    assert position["samples_seen"] == len(rows) and position["workers"] == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_any_batch_continues_exactly(tiny, workers):
    """A position taken after any batch resumes with exactly the batches (rows, pixels) that followed it:
    shuffle buffer on, several workers (round-robin), a corrupt and an invalid row skipped on the way."""
    cfg = _cfg(tiny, workers=workers, batch_size=3, student_augs=True, rand_augment="rand-m9-n2-mstd0.5-inc1")
    loader = build_student_loader(cfg, labels=tiny["store"], labeler="tl")
    loader.set_epoch(1)
    full, positions = [], []
    for batch in loader:
        full.append(batch)
        positions.append(loader.position())
    assert len(full) >= 5
    for cut in range(1, len(full)):
        loader.set_epoch(1, resume=positions[cut - 1])
        rest = list(loader)
        assert _rows(rest) == _rows(full[cut:]), f"resume after batch {cut}"
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[cut:]))
        assert loader.num_skipped == 2 and loader.samples_seen == sum(len(b["row"]) for b in full)
    with pytest.raises(Exception, match="data.workers"):
        loader.set_epoch(1, resume={**positions[0], "workers": workers + 1})


def test_student_augs_change_pixels_not_shapes(tiny):
    plain = build_student_loader(_cfg(tiny), labels=tiny["store"], labeler="tl")
    aug = build_student_loader(_cfg(tiny, student_augs=True, rand_augment="rand-m9-mstd0.5-inc1"),
                               labels=tiny["store"], labeler="tl")
    a, b = list(plain), list(aug)
    assert _rows(a) == _rows(b)
    diff = [not torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p["image"], q["image"])]
    assert any(diff)
    again = list(build_student_loader(_cfg(tiny, student_augs=True, rand_augment="rand-m9-mstd0.5-inc1"),
                                      labels=tiny["store"], labeler="tl"))
    assert all(torch.equal(p["image"], q["image"]) for p, q in zip(b, again))  # seeded per (seed, epoch, row)


@pytest.mark.timeout(120)
def test_two_ranks_two_workers_cover_each_sample_once(tiny, monkeypatch):
    rows, skipped, done = [], [], []
    for rank in (0, 1):
        loader = build_student_loader(_cfg(tiny, workers=2), labels=tiny["store"], labeler="tl",
                                      rank=rank, world_size=2)
        loader.set_epoch(1)
        rows += _rows(loader)
        skipped += [s["key"] for s in loader.skipped]
        done += loader.position()["done_shards"]
    assert len(rows) == len(set(rows)) == NUM_SHARDS * PER_SHARD - 2
    assert sorted(skipped) == ["s1_002", "s2_000"] and sorted(done) == [0, 1, 2, 3]
    monkeypatch.setenv("RANK", "1")  # no explicit rank: webdataset's split_by_node reads the environment
    monkeypatch.setenv("WORLD_SIZE", "2")
    env_loader = build_student_loader(_cfg(tiny), labels=tiny["store"], labeler="tl")
    explicit = build_student_loader(_cfg(tiny), labels=tiny["store"], labeler="tl", rank=1, world_size=2)
    assert _rows(env_loader) == _rows(explicit)


def test_resume_skips_done_shards_and_order_follows_epoch(tiny):
    loader = build_student_loader(_cfg(tiny, shuffle_buffer=0), labels=tiny["store"], labeler="tl")
    loader.set_epoch(0)
    full = _rows(loader)
    order = loader.stream.order()
    loader.set_epoch(0, skip_shards=[0, 1])
    rest = _rows(loader)
    done_urls = {order[0], order[1]}
    store = LabelStore.open(tiny["store"])
    shard_of = {s.url: s for s in store.shards}
    assert set(rest) == {r for r in full if not any(shard_of[u].first_row <= r < shard_of[u].stop for u in done_urls)}
    assert loader.position()["done_shards"] == [0, 1, 2, 3]
    loader.set_epoch(1)
    assert loader.stream.order() != order or NUM_SHARDS < 3


def test_bad_inputs_fail_clearly(tiny, tmp_path):
    with pytest.raises(SchemaMismatch, match="no labeler 'nope'.*'tl'"):
        build_student_loader(_cfg(tiny), labels=tiny["store"], labeler="nope")
    with pytest.raises(SchemaMismatch, match=r"num_classes: store has 10, expected 1000"):
        build_student_loader(_cfg(tiny), labels=tiny["store"], labeler="tl", num_classes=1000)
    with pytest.raises(SchemaMismatch, match="input_size"):
        build_student_loader(_cfg(tiny, input_size=64), labels=tiny["store"], labeler="tl")
    other = str(tmp_path / "other-000000.tar")
    with wds.TarWriter(other) as w:
        w.write({"__key__": "x", "jpg": tiny["samples"]["s0_000"][0], "cls": 1})
    with pytest.raises(SchemaMismatch, match="other-000000.tar.*another shard list"):
        build_student_loader(_cfg(tiny, shards=(other,)), labels=tiny["store"], labeler="tl")
    moved = tmp_path / "train-000000.tar"  # same file name, other contents: a key the store never saw
    with wds.TarWriter(str(moved)) as w:
        w.write({"__key__": "stranger", "jpg": tiny["samples"]["s0_000"][0], "cls": 1})
    loader = build_student_loader(_cfg(tiny, shards=(str(moved),)), labels=tiny["store"], labeler="tl")
    with pytest.raises(MissingRow, match="'stranger'.*train-000000.tar"):
        list(loader)


def test_truncated_shard_counts_missing_samples(tiny, tmp_path):
    data = open(tiny["urls"][3], "rb").read()
    cut = tmp_path / "train-000003.tar"
    cut.write_bytes(data[: len(data) // 2])
    loader = build_student_loader(_cfg(tiny, shards=(str(cut),)), labels=tiny["store"], labeler="tl")
    with pytest.warns(UserWarning):
        rows = _rows(loader)
    missing = [s for s in loader.skipped if "missing from the tar" in s["reason"]]
    assert len(rows) + len(missing) == PER_SHARD and missing and loader.position()["done_shards"] == [0]


def test_labeler_and_eval_loaders(tiny):
    cfg = _cfg(tiny, input_size=24, shuffle_buffer=0)
    lab = build_labeler_loader(cfg)
    batches = list(lab)
    assert sum(len(b["label"]) for b in batches) == NUM_SHARDS * PER_SHARD - 1  # only the corrupt one is lost
    assert batches[0]["image"].dtype == torch.uint8 and batches[0]["image"].shape[1:] == (3, 24, 24)
    assert lab.num_skipped == 1 and lab.skipped[0]["key"] == "s1_002"
    again = list(build_labeler_loader(cfg))
    assert all(torch.equal(p["image"], q["image"]) for p, q in zip(batches, again))
    ev = build_eval_loader(cfg)
    keys = [k for b in ev for k in b["key"]]
    assert keys == [f"s{s}_{i:03d}" for s in range(NUM_SHARDS) for i in range(PER_SHARD) if (s, i) != CORRUPT]


def test_loader_batch_through_target_builder(tiny):
    from trainer.data_config import TokenLabelConfig
    from trainer.target_builder import TargetBuilder

    loader = build_student_loader(_cfg(tiny, student_augs=True), labels=tiny["store"], labeler="tl", num_classes=C)
    tb = TargetBuilder(num_classes=C, data=loader.stream.pipeline.cfg, tokens=TokenLabelConfig(),
                       store_grid=loader.store_grid, student_grid=(2, 2))
    batch = next(iter(loader))
    images, cls_t, tok_t = tb(batch, step=0)
    b = len(batch["label"])
    assert images.shape == (b, 3, *SIZE) and cls_t.shape == (b, C) and tok_t.shape == (b, 4, C)
    assert loader.store_grid == GRID and loader.input_size == SIZE and loader.num_classes == C
    assert loader.num_samples == NUM_SHARDS * PER_SHARD - 1 and loader.batches_per_epoch(2) == 3


def test_dense_store_batches(tiny):
    from trainer.data_config import TokenLabelConfig
    from trainer.target_builder import TargetBuilder

    loader = build_student_loader(_cfg(tiny), labels=tiny["store"], labeler="dense", num_classes=C)
    batch = next(iter(loader))
    assert batch["token_logit"].shape[1:] == (16, C) and "token_class" not in batch
    tb = TargetBuilder(num_classes=C, data=_cfg(tiny), tokens=TokenLabelConfig(mode="softmax"),
                       store_grid=loader.store_grid)
    assert tb(batch, step=1)[2].shape == (len(batch["label"]), 16, C)


@pytest.mark.parametrize("augs", [False, True])
def test_device_path_renders_and_augments_what_the_cpu_path_gives(tiny, augs):
    """Workers decode only; TargetBuilder renders the stored view (labeler.render_batch) and applies the same
    photometric draw (trainer.photometric_torch) on the device: the same images as the Pillow path in the workers."""
    from trainer.target_builder import TargetBuilder

    cfg = _cfg(tiny, student_augs=augs, shuffle_buffer=0)
    cpu = build_student_loader(cfg, labels=tiny["store"], labeler="tl", num_classes=C)
    dev = build_student_loader(cfg, labels=tiny["store"], labeler="tl", num_classes=C, render_on_device=True)
    assert dev.render_on_device and not cpu.render_on_device
    builder = TargetBuilder(num_classes=C, data=cfg, view_spec=dev.view_spec, train=False)
    for ld in (cpu, dev):
        ld.set_epoch(1)
    applied, sent, whole = 0, 0, 0
    for a, b in zip(cpu, dev, strict=True):
        region, image = b["source"].hw, b["source_hw"].numpy()  # workers send the view's footprint only
        assert (b["source_origin"].numpy() + region <= image).all()
        sent, whole = sent + int(np.prod(region, 1).sum()), whole + int(np.prod(image, 1).sum())
        assert "image" not in b and isinstance(b["source"], FlatImages) and b["params"].shape[0] == len(b["row"])
        assert torch.equal(a["row"], b["row"]) and torch.equal(a["token_logit"], b["token_logit"])
        got = builder.render(b)
        diff = (got.int() - a["image"].int()).abs()
        assert diff.float().mean() <= 0.01 and diff.max() <= 1, (diff.float().mean(), diff.max())
        if augs:
            assert b["photo_ops"].shape[0] == len(b["row"]) and b["photo_ops"].shape == b["photo_args"].shape
            applied += int((b["photo_ops"] >= 0).sum())
    assert not augs or applied > 0  # the draw applied ops: the comparison covered the photometric path
    assert sent < whole


@pytest.mark.timeout(120)
def test_device_path_workers_hand_over_shared_flat_images_that_pin(tiny, monkeypatch):
    """Workers pack the decoded images unpadded into shared memory (the DataLoader copies nothing more), the
    batches equal the in-process ones, and torch's pin step calls FlatImages.pin_memory (this torch version)."""
    from torch.utils.data._utils.pin_memory import pin_memory as torch_pin_memory

    cfg = _cfg(tiny, shuffle_buffer=0)
    inline = build_student_loader(cfg, labels=tiny["store"], labeler="tl", render_on_device=True)
    workers = build_student_loader(dataclasses.replace(cfg, workers=2), labels=tiny["store"], labeler="tl",
                                   render_on_device=True)
    inline.set_epoch(0)
    workers.set_epoch(0)
    def per_row(loader):
        out = {}
        for b in loader:
            assert isinstance(b["source"], FlatImages)
            out.update({int(r): (b, i) for i, r in enumerate(b["row"])})
        return out

    got, want = per_row(workers), per_row(inline)
    assert got.keys() == want.keys() and got
    for row, (b, i) in got.items():
        assert b["source"].data.is_shared()
        np.testing.assert_array_equal(b["source"].image(i), want[row][0]["source"].image(want[row][1]))
    pinned = []
    monkeypatch.setattr(FlatImages, "pin_memory", lambda self: pinned.append(self) or self)
    batch = next(iter(got.values()))[0]
    out = torch_pin_memory({"source": batch["source"], "meta": {}})
    assert pinned == [batch["source"]] and out["source"] is batch["source"]


def _rewrite_shard(src, dst, change):
    """Copy a shard keeping names and keys; `change(key, jpeg bytes) -> bytes`."""
    with wds.TarWriter(str(dst)) as w:
        for s in wds.WebDataset(src, shardshuffle=False):
            w.write({"__key__": s["__key__"], "jpg": change(s["__key__"], s["jpg"]), "cls": s["cls"]})


def _resized(factor):
    def change(key, data):
        img = Image.open(io.BytesIO(data))
        b = io.BytesIO()
        img.resize((max(1, int(img.width * factor)), max(1, int(img.height * factor)))).save(b, "JPEG")
        return b.getvalue()
    return change


@pytest.mark.timeout(120)
# Two workers over one shard is on purpose (the error must cross the worker boundary); the idle-worker
# warning it raises is expected here.
@pytest.mark.filterwarnings("ignore:data.workers=2 but each rank reads only 1 shard")
@pytest.mark.parametrize("factor, workers", [(2.0, 0), (0.5, 2)])
def test_images_changed_since_labelling_stop_the_run_naming_the_shard(tiny, tmp_path, factor, workers):
    from trainer.errors import ShardsChanged

    moved = tmp_path / "train-000000.tar"  # same name and keys as labelled, every image resized
    _rewrite_shard(tiny["urls"][0], moved, _resized(factor))
    loader = build_student_loader(_cfg(tiny, shards=(str(moved),), workers=workers), labels=tiny["store"], labeler="tl")
    with pytest.raises(ShardsChanged, match=r"train-000000.tar.*changed since labelling") as e:
        list(loader)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_one_changed_image_is_a_skipped_row_with_its_reason(tiny, tmp_path):
    moved = tmp_path / "train-000000.tar"
    _rewrite_shard(tiny["urls"][0], moved, lambda key, data: _resized(2.0)(key, data) if key == "s0_001" else data)
    loader = build_student_loader(_cfg(tiny, shards=(str(moved),)), labels=tiny["store"], labeler="tl")
    rows = _rows(loader)
    assert len(rows) == PER_SHARD - 1 and loader.num_skipped == 1
    assert loader.skipped[0]["key"] == "s0_001" and "changed since labelling" in loader.skipped[0]["reason"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_label_chunk_is_one_line_naming_the_shard(tiny, tmp_path, workers):
    import shutil

    from labelstore import StoreError
    from trainer.errors import TrainerError

    store = tmp_path / "labels.zarr"
    shutil.copytree(tiny["store"], store)
    chunks = sorted((store / "labelers" / "tl" / "tokens" / "topk_logit" / "c").rglob("*"))
    for chunk in [c for c in chunks if c.is_file()]:
        chunk.write_bytes(chunk.read_bytes()[:7])  # truncated: zarr's checksum / decompression fails
    loader = build_student_loader(_cfg(tiny, workers=workers), labels=str(store), labeler="tl")
    with pytest.raises((StoreError, TrainerError), match=r"train-00000\d.tar|shard") as e:
        list(loader)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value), str(e.value)


@pytest.mark.timeout(120)
def test_labeler_loader_resumes_exactly_too(tiny):
    loader = build_labeler_loader(_cfg(tiny, input_size=24, workers=2, batch_size=3))
    loader.set_epoch(2)
    full, positions = [], []
    for batch in loader:
        full.append(batch)
        positions.append(loader.position())
    for cut in (1, len(full) // 2, len(full) - 1):
        loader.set_epoch(2, resume=positions[cut - 1])
        rest = list(loader)
        assert [b["key"] for b in rest] == [b["key"] for b in full[cut:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[cut:]))
