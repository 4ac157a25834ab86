"""Each student data stage on plain Python lists (no tar, no store, no DataLoader)."""
import io

import numpy as np
import pytest
from PIL import Image

from labelstore import EncodedLogits, ShardRows, ViewSpec, decode_image, draw_view_params, render
from trainer.epoch_ledger import EpochLedger
from trainer.stages import (
    LabelJoin, augment_views, batch_samples, collate_student, enter_samples, join_labels, lookup_rows,
    replay_views, track_shards,
)
from trainer.student_augment import StudentAugment, sample_seed
from trainer.view_choice import choose_view

SPEC = ViewSpec(size=(16, 16))


def _png(v, h=20, w=24):
    b = io.BytesIO()
    Image.new("RGB", (w, h), (v, 255 - v, 7)).save(b, "PNG")
    return b.getvalue()


def _rows(url="a.tar", idx=0, first=8, keys=("k0", "k1", "k2"), valid=(True, True, True)):
    return ShardRows(shard_index=idx, url=url, first_row=first, num_samples=len(keys),
                     keys={k: first + i for i, k in enumerate(keys)}, valid=np.array(valid),
                     labels=np.array([3, -1, 5], np.int32)[:len(keys)])


class _Index:
    def __init__(self, *rows):
        self.rows = {r.url: r for r in rows}

    def shard_rows(self, url):
        return self.rows[url]


def test_track_shards_closes_a_shard_when_the_next_is_asked_for():
    ledger = EpochLedger()
    it = track_shards(iter([{"url": "a", "__pos__": 0}, {"url": "b", "__pos__": 1}]), ledger)
    next(it)
    assert ledger.closed_unfinished() == []
    next(it)
    assert ledger.closed_unfinished() == [(0, "a")]
    assert list(it) == [] and ledger.closed_unfinished() == [(0, "a"), (1, "b")]


def test_enter_samples_records_missing_keys_and_shards_finish():
    ledger = EpochLedger()
    src = [{"__url__": "a.tar", "__key__": "k0"}, {"__url__": "a.tar", "__key__": "k2"},
           {"__url__": "b.tar", "__key__": "x"}]
    for p, u in ((0, "a.tar"), (1, "b.tar")):
        ledger.opened(p, u)
        ledger.closed(p)
    expected = {"a.tar": ["k0", "k1", "k2"], "b.tar": ["x"]}
    out = list(enter_samples(iter(src), ledger, {"a.tar": 0, "b.tar": 1}, expected.get))
    assert [s["__pos__"] for s in out] == [0, 0, 1]
    for s in out:
        ledger.left(s["__pos__"])
    report = ledger.drain()
    assert report["done_shards"] == [0, 1]
    assert report["skipped"] == [{"url": "a.tar", "key": "k1",
                                  "reason": "missing from the tar stream (truncated or unreadable shard)"}]


def test_lookup_rows_joins_by_key_skips_invalid_and_fails_on_unknown_key():
    ledger = EpochLedger()
    idx = _Index(_rows(valid=(True, False, True)))
    src = [{"__url__": "a.tar", "__key__": k, "__pos__": 0, "cls": b"9"} for k in ("k2", "k1", "k0")]
    out = list(lookup_rows(iter(src), idx, ledger))
    assert [(s["__row__"], s["label"]) for s in out] == [(10, 5), (8, 3)]
    assert ledger.drain()["skipped"][0]["key"] == "k1"
    idx = _Index(_rows(valid=(True, True, True)))
    out = list(lookup_rows(iter(src[1:2]), idx, ledger))
    assert out[0]["label"] == 9  # unknown in the store (-1): the tar's own cls
    assert list(lookup_rows(iter([{**src[1], "cls": None}]), idx, ledger)) == []
    assert "no class label" in ledger.drain()["skipped"][-1]["reason"]
    with pytest.raises(Exception, match="'zz'.*a.tar"):
        list(lookup_rows(iter([{"__url__": "a.tar", "__key__": "zz", "__pos__": 0}]), idx, ledger))


class _Reader:
    """Stands in for LabelerStore.read: records each (rows, view) read."""

    def __init__(self, t=4, k=2):
        self.reads, self.t, self.k = [], t, k

    def read(self, rows, view):
        self.reads.append((rows.start, rows.stop, view))
        n = rows.stop - rows.start
        base = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None, None] + 100 * view
        logit = np.broadcast_to(base, (n, self.t, self.k)).astype(np.float16)
        return {"params": np.tile(base[:, 0], (1, 9)),
                "tokens": EncodedLogits(logit, np.zeros((n, self.t, self.k), np.int16), logit[..., 0])}


def test_label_join_reads_each_chunk_once_within_the_shard():
    reader = _Reader()
    join = LabelJoin(reader, rows_per_chunk=4, num_rows=16, num_views=3, run_seed=1, epoch=2)
    idx = _Index(_rows(keys=("k0", "k1", "k2", "k3", "k4", "k5"), valid=(True,) * 6))  # rows 8..13
    src = [{"__url__": "a.tar", "__row__": r} for r in range(8, 14)]
    out = list(join_labels(iter(src), join, idx))
    views = [choose_view(1, 2, 2, 3), choose_view(1, 2, 3, 3)]
    assert reader.reads == [(8, 12, views[0]), (12, 14, views[1])]  # padding rows 14, 15 never read
    for s in out:
        assert s["view"] == views[(s["__row__"] - 8) // 4]
        assert float(s["token_logit"][0, 0]) == s["__row__"] + 100 * s["view"]
        assert s["params"].shape == (9,) and s["token_class"].shape == (4, 2) and s["token_tail"].shape == (4,)
    first = LabelJoin(_Reader(), 4, 16, 3, 1, 2, view_choice="first")
    assert {s["view"] for s in join_labels(iter(src), first, idx)} == {0}


def test_replay_views_renders_stored_params_and_skips_corrupt():
    ledger = EpochLedger()
    params = draw_view_params(SPEC, 3, 0, 0, (20, 24))
    good = {"__url__": "a.tar", "__key__": "k0", "__pos__": 0, "__row__": 8, "png": _png(40), "params": params,
            "label": 1, "txt": b"dropped"}
    bad = {**good, "__key__": "k1", "png": b"nope"}
    none = {k: v for k, v in good.items() if k != "png"} | {"__key__": "k2"}
    out = list(replay_views(iter([good, bad, none]), SPEC, ledger))
    assert len(out) == 1 and "png" not in out[0] and "txt" not in out[0]
    assert np.array_equal(out[0]["image"], render(decode_image(_png(40)), params, SPEC))
    skipped = ledger.drain()["skipped"]
    assert [s["key"] for s in skipped] == ["k1", "k2"] and "cannot decode" in skipped[0]["reason"]


def test_augment_views_seeded_per_row_and_photometric_only():
    spec = ViewSpec(size=(16, 16), ra_prob=1.0)
    aug = StudentAugment("rand-m9-mstd0.5-inc1-p1", spec)
    assert not {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"} & set(aug.ops)
    img = np.asarray(Image.open(io.BytesIO(_png(90, 16, 16))).convert("RGB")).copy()
    img[4:8] = 200
    src = [{"__row__": r, "image": img, "params": draw_view_params(spec, 0, r, 0, (16, 16))} for r in range(12)]
    a = list(augment_views(iter(src), aug, run_seed=0, epoch=0))
    b = list(augment_views(iter(src[::-1]), aug, run_seed=0, epoch=0))[::-1]  # order does not matter
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert any(not np.array_equal(x["image"], img) for x in a)
    assert list(augment_views(iter(src), None, 0, 0)) == src
    assert sample_seed(0, 0, 5).generate_state(1) != sample_seed(0, 1, 5).generate_state(1)


def _sample(pos, key, t=4, k=2):
    return {"__url__": f"{pos}.tar", "__key__": key, "__pos__": pos, "__row__": 1, "label": 2, "view": 0,
            "image": np.zeros((8, 8, 3), np.uint8), "token_logit": np.zeros((t, k), np.float16),
            "token_class": np.zeros((t, k), np.int16), "token_tail": np.zeros(t, np.float16)}


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_samples_reports_done_shards_and_ends_with_meta(drop_last):
    ledger = EpochLedger()
    src = [_sample(0, f"k{i}") for i in range(5)]
    ledger.opened(0, "0.tar")
    ledger.closed(0)
    for s in src:
        ledger.entered(0, s["__key__"])
    ledger.finished(0)
    out = list(batch_samples(iter(src), 2, ledger, collate_student, drop_last=drop_last))
    batches = [b for b in out if "image" in b]
    assert [len(b["label"]) for b in batches] == ([2, 2] if drop_last else [2, 2, 1])
    assert "image" not in out[-1]
    assert sum((b["meta"]["done_shards"] for b in out), []) == [0]
    dropped = sum((b["meta"]["skipped"] for b in out), [])
    assert [d["key"] for d in dropped] == (["k4"] if drop_last else [])
    b = batches[0]
    assert b["image"].shape == (2, 3, 8, 8) and b["token_logit"].shape == (2, 4, 2) and b["token_tail"].shape == (2, 4)

