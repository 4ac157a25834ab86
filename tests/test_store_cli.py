"""`stl-labels info | verify | bench store` through the typer app."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import labelstore as L
from conftest import fake_shard
from pipelines.cli_labels import app

runner = CliRunner()


@pytest.fixture
def store(tmp_path, tiny_labeler_spec):
    st = L.LabelStore.create(tmp_path / "labels.zarr", seed=7, rows_per_chunk=8)
    st.register_shards([("a.tar", 10), ("b.tar", 5)])
    lab = st.add_labeler(tiny_labeler_spec)
    batch = fake_shard(st, tiny_labeler_spec, 0)
    batch["valid"][1] = False
    lab.write_shard(0, errors=[{"key": batch["keys"][1], "reason": "bad jpeg"}], **batch)
    return st


def test_info_reports_labelers_progress_and_bytes(store):
    r = runner.invoke(app, ["info", store.path])
    assert r.exit_code == 0, r.output
    assert "2 shards, 15 sample rows (9 valid, 24 allocated)" in r.stdout
    assert "labeler     tiny: fan_test_p4_hybrid_token, 20 classes, grid 4x4" in r.stdout
    assert "shards done 1/2, rows 10, recorded errors 1" in r.stdout and "B/view" in r.stdout
    assert "checkpoint NONE: random weights (no checkpoint)" in r.stdout  # a labeler with no checkpoint says so
    facts = json.loads(runner.invoke(app, ["info", store.path, "--json"]).stdout)
    lab = facts["labelers"][0]
    assert (lab["shards_done"], lab["shards_total"], lab["topk"]) == (1, 2, 4) and lab["bytes_per_view"] > 0


def test_info_lists_invalid_rows_first_n_and_all(store, tiny_labeler_spec):
    lab = store.labeler("tiny")
    batch = fake_shard(store, tiny_labeler_spec, 1)
    for i in range(4):
        batch["valid"][i] = False
    lab.write_shard(1, errors=[{"key": batch["keys"][i], "reason": f"bad {i}"} for i in range(4)], **batch)
    r = runner.invoke(app, ["info", store.path, "--invalid", "2"])
    assert r.exit_code == 0, r.output
    assert "invalid rows 5 (first 2):" in r.stdout and "bad jpeg" in r.stdout and "in shard 0 (a.tar)" in r.stdout
    assert "bad 0" in r.stdout and "bad 1" not in r.stdout and "... and 3 more (--all-invalid lists every one)" in r.stdout
    r = runner.invoke(app, ["info", store.path, "--all-invalid"])
    assert "invalid rows 5:" in r.stdout and "bad 3" in r.stdout and "more" not in r.stdout
    facts = json.loads(runner.invoke(app, ["info", store.path, "--json", "--invalid", "1"]).stdout)["labelers"][0]
    assert facts["errors"] == 5 and len(facts["invalid_rows"]) == 1
    assert set(facts["invalid_rows"][0]) == {"key", "shard", "url", "row", "reason"}
    assert facts["invalid_rows"][0]["url"] == "a.tar" and facts["invalid_rows"][0]["reason"] == "bad jpeg"


def test_verify_ok_then_precise_failure(store):
    r = runner.invoke(app, ["verify", store.path])
    assert r.exit_code == 0 and "OK" in r.stdout and "1 of 2 shards not done yet (1)" in r.stdout
    raw = zarr.open_group(store.path, mode="r+")["labelers/tiny/tokens/tail_lse"]
    block = raw[0:8]
    block[4, 2, 7] = np.nan
    raw[0:8] = block
    r = runner.invoke(app, ["verify", store.path, "--labeler", "tiny"])
    assert r.exit_code == 1
    assert "PROBLEM labelers/tiny shard 0 (a.tar): tokens/tail_lse: NaN/+inf at rows [4]" in r.stdout
    assert runner.invoke(app, ["verify", store.path, "--labeler", "ghost"]).exit_code == 1


def test_missing_store_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path / "none.zarr")])
    assert r.exit_code == 2 and "no label store" in r.stderr
    r = runner.invoke(app, ["verify", str(tmp_path / "none.zarr")])
    assert r.exit_code == 1 and "cannot open store" in r.stdout


def test_bench_store_prints_a_row_per_k(tmp_path):
    r = runner.invoke(app, ["bench", "store", "--logits", "random", "--rows", "16", "--dense-rows", "8",
                            "--rows-per-chunk", "8", "--unique-views", "8", "--views", "2", "--ks", "3,0",
                            "--random-reads", "3", "--out", str(tmp_path / "bench")])
    assert r.exit_code == 0, r.output
    assert "random logits" in r.stdout and "NOT teacher-like" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.split() and line.split()[0] in ("3", "dense")]
    assert [row[0] for row in rows] == ["3", "dense"] and all(len(row) == 8 for row in rows)
    assert float(rows[0][2]) < float(rows[1][2])  # top-3 takes fewer bytes per view than dense
