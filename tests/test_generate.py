"""`stl-labels generate` end to end on tiny shards with the tiny FAN config, on a local 2-CPU Ray.

One Ray session for the module; the store built once (`built`) serves several assertions. The
in-process tests (no Ray) cover the work unit's error paths directly.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from labeler.work_unit import ShardLabeler
from labelstore import LabelStore, SchemaMismatch, decode_image, render
from labelstore.shard_format import iter_shard
from labelstore.verify import verify_store
from pipelines.generate import GenerateSettings, labeler_spec_for, open_store, run_generate

MODEL = "fan_test_p4_hybrid_token"
REPO = Path(__file__).parents[1]


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def odd_images(rng: np.random.Generator) -> dict[str, tuple[str, bytes]]:
    """Every image mode the decoder must handle, plus one that cannot be decoded."""
    rgb = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:1800, 0:2400]
    large = np.stack([(xx // 9) % 256, (yy // 7) % 256, ((xx + yy) // 11) % 256], -1).astype(np.uint8)
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    return {
        "gray": ("jpg", encode(Image.fromarray(rgb[..., 0], "L"), "JPEG")),
        "cmyk": ("jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG")),
        "rgba": ("png", encode(Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG")),
        "sixteen": ("png", encode(Image.fromarray((rng.integers(0, 65535, (20, 24))).astype(np.uint16)), "PNG")),
        "tiny": ("png", encode(Image.fromarray(rgb[:8, :8]), "PNG")),
        "palette": ("png", encode(palette, "PNG")),
        "corrupt": ("jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"),
        "large": ("jpg", encode(Image.fromarray(large), "JPEG")),
    }


def write_shards(root) -> list[str]:
    rng = np.random.default_rng(0)
    paths = [str(root / f"s-{i:06d}.tar") for i in range(3)]
    with wds.TarWriter(paths[0]) as w:
        for i in range(5):
            img = Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 52, 3), dtype=np.uint8))
            w.write({"__key__": f"a{i}", "jpg": encode(img, "JPEG"), "cls": i})
    with wds.TarWriter(paths[1]) as w:
        for i, (key, (ext, data)) in enumerate(odd_images(rng).items()):
            w.write({"__key__": key, ext: data, "cls": i % 10})
    with wds.TarWriter(paths[2]) as w:
        for i in range(3):
            img = Image.fromarray(rng.integers(0, 256, (33, 29, 3), dtype=np.uint8))
            w.write({"__key__": f"c{i}", "webp": encode(img, "WEBP"), "json": json.dumps({"label": 9 - i}).encode()})
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    paths = write_shards(root)
    torch.manual_seed(0)
    import labeler.models as models

    torch.save(models.create_token_model(MODEL, num_classes=10).state_dict(), root / "teacher.pth")
    return root, paths


def settings(root, store: str, shards, **kw) -> GenerateSettings:
    base = dict(shards=shards, store=store, name="fan_t", model=MODEL, checkpoint=str(root / "teacher.pth"),
                num_classes=10, views=3, topk=4, rows_per_chunk=8, batch_size=8, amp="none",
                render_backend="torch", decode_workers=1)
    return GenerateSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def built(ray_cluster, data, tmp_path_factory):
    root, paths = data
    out = tmp_path_factory.mktemp("built")
    s = settings(root, str(out / "labels.zarr"), [str(root / "s-{000000..000002}.tar")], dump_views_dir=str(out / "views"))
    return run_generate(s, log=lambda line: None), s


def read_all(store_path: str) -> dict[str, np.ndarray]:
    store = LabelStore.open(store_path)
    lab = store.labeler("fan_t")
    out = {name: np.asarray(store.samples[name][:]) for name in ("key", "label", "image_hw", "valid")}
    for path in lab.array_paths:
        out[path] = np.asarray(lab.array(path)[:])
    return out


def assert_same_labels(a: dict, b: dict) -> None:
    for name in a:
        if name == "errors":  # reasons name the shard file, which lives in another folder here
            strip = np.vectorize(lambda text: re.sub(r"\S*/", "", str(text)))
            np.testing.assert_array_equal(strip(a[name]), strip(b[name]))
        elif "logit" in name or "tail" in name:  # float16 storage: equal within its rounding
            np.testing.assert_allclose(a[name].astype(np.float32), b[name].astype(np.float32), rtol=2e-3, atol=2e-3)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.timeout(240)
def test_store_is_complete_and_verifies(built):
    result, s = built
    assert result.ok and len(result.outcomes) == 3 and result.skipped_done == []
    assert verify_store(s.store) == []
    store = LabelStore.open(s.store)
    lab = store.labeler("fan_t")
    assert lab.done_mask().all() and [sh.num_samples for sh in store.shards] == [5, 8, 3]
    assert result.views == (5 + 7 + 3) * 3


@pytest.mark.timeout(240)
def test_odd_images_handled_and_corrupt_one_recorded(built, data):
    _, s = built
    store = LabelStore.open(s.store)
    rows = store.shards[1].rows
    got = store.read_samples(rows)
    keys = list(got["key"])
    assert keys == list(odd_images(np.random.default_rng(0)))
    assert got["valid"].tolist() == [k != "corrupt" for k in keys]
    hw = dict(zip(keys, got["image_hw"].tolist()))
    assert hw["tiny"] == [8, 8] and hw["large"] == [1800, 2400] and hw["sixteen"] == [20, 24] and hw["corrupt"] == [0, 0]
    errors = store.labeler("fan_t").errors()
    assert [(e["shard"], e["key"]) for e in errors] == [(1, "corrupt")] and "cannot decode" in errors[0]["reason"]
    result = built[0]  # the run's summary names the invalid samples and how to list them all
    assert [(e["key"], e["url"]) for e in result.invalid] == [("corrupt", store.shards[1].url)]
    summary = result.summary()
    assert "1 invalid sample(s) recorded" in summary and f"corrupt in {store.shards[1].url}: " in summary
    assert "cannot decode" in summary
    assert f"stl-labels info {s.store} --all-invalid" in summary
    from pipelines.cli_labels import app

    info = CliRunner().invoke(app, ["info", s.store])
    assert info.exit_code == 0 and "invalid rows 1:" in info.stdout
    assert f"corrupt in shard 1 ({store.shards[1].url}): " in info.stdout and "cannot decode" in info.stdout
    labels = store.read_samples(store.shards[2].rows)["label"]
    assert labels.tolist() == [9, 8, 7]  # from the json member


@pytest.mark.timeout(240)
def test_stored_params_rerender_the_pixels_the_teacher_saw(built, data):
    from labeler.flat_images import render_images

    _, s = built
    store = LabelStore.open(s.store)
    lab = store.labeler("fan_t")
    for shard in store.shards[:2]:
        seen = np.load(os.path.join(s.dump_views_dir, f"shard-{shard.index:06d}.npy"))
        samples = {x.key: x for x in iter_shard(shard.url)}
        got = store.read_samples(shard.rows)
        for pos, (key, valid) in enumerate(zip(got["key"], got["valid"])):
            if not valid:
                continue
            image = decode_image(samples[key].image)
            params = np.stack([lab.read(slice(shard.first_row + pos, shard.first_row + pos + 1), v)["params"][0]
                               for v in range(s.views)])
            again = render_images([np.asarray(image)], [params], lab.spec.view_spec).permute(0, 2, 3, 1).numpy()
            assert np.abs(again.astype(int) - seen[pos]).max() <= 1  # same renderer, another batch around it
            reference = np.stack([render(image, p, lab.spec.view_spec) for p in params])  # what the trainer renders
            assert np.abs(reference.astype(int) - seen[pos]).max() <= 1


@pytest.mark.timeout(300)
def test_resume_truncated_shard_fails_then_rerun_retries(built, data, tmp_path):
    from pipelines.cli_labels import app

    root, paths = data
    work = tmp_path / "shards"
    work.mkdir()
    for p in paths:
        shutil.copy(p, work)
    bad = work / "s-000003.tar"
    bad.write_bytes(open(paths[2], "rb").read()[:3000])  # cut mid-archive
    s = settings(root, str(tmp_path / "labels.zarr"), [str(work / "s-{000000..000002}.tar")])
    spec = labeler_spec_for(s)
    store, _ = open_store(s, spec)
    store.register_shards([(str(work / "s-000000.tar"), 5)])
    ShardLabeler(s.store, "fan_t", s.worker_settings())(0)  # the part a crashed run had finished

    args = ["generate", "--shards", str(work / "s-{000000..000003}.tar"), "--store", s.store, "--name", "fan_t",
            "--model", MODEL, "--checkpoint", s.checkpoint, "--views", "3", "--topk", "4",  # 10 classes: read from it
            "--batch-size", "8", "--amp", "none", "--set", "rows_per_chunk=8", "--set", "render_backend=torch",
            "--set", "decode_workers=1", "--set", "cpus_per_worker=2"]  # one actor: faster start
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    assert "skipping 1 shard already done" in first.output and "labelled 2 shards" in first.output
    assert f"failed: {bad}" in first.output and "truncated" in first.output
    assert "corrupt in " in first.output and "--all-invalid" in first.output  # the summary names invalid samples

    bad.write_bytes(open(paths[2], "rb").read())  # repaired: the re-run labels only that shard
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "skipping 3 shards already done" in second.output and "labelled 1 shard " in second.output
    assert verify_store(s.store) == []
    resumed, reference = read_all(s.store), read_all(built[1].store)
    n = reference["key"].shape[0]  # the first three shards sit on the same rows in both stores
    assert_same_labels({k: v[:n] for k, v in resumed.items() if k != "done"},
                       {k: v for k, v in reference.items() if k != "done"})

    third = CliRunner().invoke(app, args)
    assert third.exit_code == 0 and "nothing to do" in third.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_killed_mid_shard_is_retried_and_store_equals_uninterrupted(built, data, tmp_path, monkeypatch):
    root, _ = data
    marker = tmp_path / "killed"
    monkeypatch.setenv("STL_FAULT_KILL_AFTER", "3")
    monkeypatch.setenv("STL_FAULT_MARKER", str(marker))
    s = settings(root, str(tmp_path / "labels.zarr"), [str(root / "s-{000000..000002}.tar")])
    result = run_generate(s, log=lambda line: None)
    assert marker.exists() and "killed pid" in marker.read_text()  # the kill happened
    assert result.ok, result.failed
    assert verify_store(s.store) == []
    assert_same_labels(read_all(s.store), read_all(built[1].store))


@pytest.mark.timeout(300)
def test_decode_processes_inside_ray_actors_label_like_threads(built, data, tmp_path):
    """What a GPU worker runs (spawned decode processes, several shards in flight on a threaded actor), here
    on a CPU actor: the store equals the thread-pool one row for row."""
    root, _ = data
    s = settings(root, str(tmp_path / "labels.zarr"), [str(root / "s-{000000..000002}.tar")],
                 decode_pool="process", decode_workers=2, shards_in_flight=3)
    result = run_generate(s, log=lambda line: None)
    assert result.ok, result.failed
    assert verify_store(s.store) == []
    assert_same_labels(read_all(s.store), read_all(built[1].store))


@pytest.mark.timeout(240)
def test_moved_shards_are_the_same_shards_and_relative_paths_work(built, data, tmp_path, monkeypatch):
    root, paths = data
    moved = tmp_path / "elsewhere" / "shards"
    moved.mkdir(parents=True)
    for p in paths:
        shutil.copy(p, moved)
    store_copy = tmp_path / "labels.zarr"
    shutil.copytree(built[1].store, store_copy)
    monkeypatch.chdir(tmp_path / "elsewhere")
    s = settings(root, str(store_copy), ["shards/s-{000000..000002}.tar"])
    result = run_generate(s, log=lambda line: None)
    assert result.ok and len(result.skipped_done) == 3 and result.outcomes == []  # nothing relabelled
    assert len(LabelStore.open(str(store_copy)).shards) == 3
    (moved / "s-000002.tar").write_bytes(open(paths[0], "rb").read())  # another file under a labelled name
    with pytest.raises(SchemaMismatch, match="other contents"):
        run_generate(s, log=lambda line: None)


@pytest.mark.timeout(240)
def test_interrupt_says_what_finished_and_that_a_rerun_resumes(ray_cluster, data, tmp_path, monkeypatch):
    from pipelines import generate, ray_jobs
    from pipelines.cli_labels import app

    root, paths = data
    real = ray_jobs.label_shards

    def interrupted_after_one(store_path, name, ws, shards, plan, on_outcome, **kw):
        real(store_path, name, ws, shards[:1], plan, on_outcome=on_outcome, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(ray_jobs, "label_shards", interrupted_after_one)
    s = settings(root, str(tmp_path / "labels.zarr"), [str(root / "s-{000000..000002}.tar")])
    with pytest.raises(generate.GenerateInterrupted, match=r"1 shard\(s\) finished .* run the same command again"):
        run_generate(s, log=lambda line: None)
    assert LabelStore.open(s.store).labeler("fan_t").missing_shards() == [1, 2]
    assert not list((tmp_path / "labels.zarr" / ".leases").rglob("*.json"))  # leases given back

    def ctrl_c(settings):
        raise generate.GenerateInterrupted("interrupted: 1 shard(s) finished and kept in this run")
    monkeypatch.setattr(generate, "run_with_progress", ctrl_c)
    out = CliRunner().invoke(app, ["generate", "--shards", paths[0], "--store", s.store, "--name", "fan_t",
                                   "--model", MODEL, "--random-weights"])
    assert out.exit_code == 130 and "finished and kept" in out.output and "Traceback" not in out.output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_generate_drivers_on_one_fresh_store_label_each_shard_once(data, tmp_path):
    root, _ = data
    store = str(tmp_path / "labels.zarr")
    args = [sys.executable, "-m", "pipelines.cli_labels", "generate", "--shards", str(root / "s-{000000..000002}.tar"),
            "--store", store, "--name", "fan_t", "--model", MODEL, "--checkpoint", str(root / "teacher.pth"),
            "--views", "3", "--topk", "4", "--batch-size", "8", "--amp", "none", "--set", "rows_per_chunk=8",
            "--set", "decode_workers=1", "--set", "cpus_per_worker=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=540)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    labelled = [int(m) for out in outs for m in re.findall(r"labelled (\d+) shards?\b", out)]
    assert sum(labelled) == 3, outs  # every shard exactly once between the two drivers
    assert "Traceback" not in "".join(outs)
    assert LabelStore.open(store).labeler("fan_t").missing_shards() == [] and verify_store(store) == []


# --- in-process (no Ray): the work unit's error paths ---------------------------------------------

def prepared_store(data, tmp_path, shard_paths, **kw):
    root, _ = data
    s = settings(root, str(tmp_path / "labels.zarr"), shard_paths, **kw)
    store, _ = open_store(s, labeler_spec_for(s))
    return s, store


@pytest.mark.timeout(120)
def test_shard_over_capacity_is_refused_before_writing(data, tmp_path):
    _, paths = data
    path = tmp_path / "grow.tar"
    shutil.copy(paths[0], path)
    s, store = prepared_store(data, tmp_path, [str(path)])
    store.register_shards([(str(path), 5)])
    with wds.TarWriter(str(path)) as w:  # the file grows after registration: 9 samples for 5 rows
        for i in range(9):
            w.write({"__key__": f"g{i}", "png": encode(Image.new("RGB", (9, 9)), "PNG"), "cls": 1})
    outcome = ShardLabeler(s.store, "fan_t", s.worker_settings())(0)
    assert not outcome.ok and "ShardCapacityError" in outcome.error and "grow.tar" in outcome.error
    assert "5 rows" in outcome.error
    lab = LabelStore.open(s.store).labeler("fan_t")
    assert not lab.done_mask()[0] and (np.asarray(LabelStore.open(s.store).samples.key[:8]) == "").all()


@pytest.mark.timeout(120)
def test_shard_truncated_after_registration_fails_with_url(data, tmp_path):
    _, paths = data
    path = tmp_path / "cut.tar"
    shutil.copy(paths[0], path)
    s, store = prepared_store(data, tmp_path, [str(path)])
    store.register_shards([(str(path), 5)])
    data_bytes = open(paths[0], "rb").read()
    path.write_bytes(data_bytes[: len(data_bytes) // 2])
    outcome = ShardLabeler(s.store, "fan_t", s.worker_settings())(0)
    assert not outcome.ok and "cut.tar" in outcome.error and "truncated" in outcome.error
    assert not LabelStore.open(s.store).labeler("fan_t").done_mask()[0]


@pytest.mark.timeout(120)
def test_pillow_backend_renders_exactly_the_reference_views(data, tmp_path):
    _, paths = data
    s, store = prepared_store(data, tmp_path, [paths[2]], render_backend="pillow", dump_views_dir=str(tmp_path / "v"))
    store.register_shards([(paths[2], 3)])
    assert ShardLabeler(s.store, "fan_t", s.worker_settings())(0).ok
    lab = LabelStore.open(s.store).labeler("fan_t")
    seen = np.load(tmp_path / "v" / "shard-000000.npy")
    for pos, sample in enumerate(iter_shard(paths[2])):
        for v in range(s.views):
            params = lab.read(slice(pos, pos + 1), v)["params"][0]
            np.testing.assert_array_equal(render(decode_image(sample.image), params, lab.spec.view_spec), seen[pos, v])


@pytest.mark.timeout(120)
def test_changed_settings_are_refused_with_a_diff(data, tmp_path):
    _, paths = data
    s, _ = prepared_store(data, tmp_path, [paths[2]])
    changed = settings(data[0], s.store, [paths[2]], topk=5, views=4)
    with pytest.raises(SchemaMismatch) as err:
        run_generate(changed, log=lambda line: None)
    assert "topk: store has 4, expected 5" in str(err.value) and "views: store has 3, expected 4" in str(err.value)
    with pytest.raises(SchemaMismatch, match="seed"):
        run_generate(settings(data[0], s.store, [paths[2]], seed=1), log=lambda line: None)


@pytest.mark.timeout(120)
def test_duplicate_key_gets_an_invalid_row_and_a_record(data, tmp_path):
    path = tmp_path / "dup.tar"
    with wds.TarWriter(str(path)) as w:
        for key in ("x", "y", "x"):
            w.write({"__key__": key, "png": encode(Image.new("RGB", (12, 10), (9, 9, 9)), "PNG"), "cls": 2})
    s, store = prepared_store(data, tmp_path, [str(path)])
    store.register_shards([(str(path), 3)])
    assert ShardLabeler(s.store, "fan_t", s.worker_settings())(0).ok
    store = LabelStore.open(s.store)
    got = store.read_samples(store.shards[0].rows)
    assert got["key"].tolist() == ["x", "y", "x#duplicate-at-2"] and got["valid"].tolist() == [True, True, False]
    assert store.find_rows(0, ["x"]).tolist() == [0]
    assert "duplicate key 'x'" in store.labeler("fan_t").errors()[0]["reason"]


@pytest.mark.timeout(120)
def test_bench_generate_prints_pipeline_forward_and_phases(data):
    from pipelines.cli_labels import app

    _, paths = data
    result = CliRunner().invoke(app, ["bench", "generate", "--shards", paths[2], "--model", MODEL, "--batch-size", "4",
                                      "--amp", "none", "--views", "2", "--num-classes", "10", "--topk", "3",
                                      "--device", "cpu", "--decode-workers", "2", "--forward-batches", "2",
                                      "--profile-batches", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "profile of 2 batches (forward + top-k" in out and "Self CPU time total" in out and "aten::" in out
    assert "batch 4 views" in out and "2 decode threads" in out and "JPEG decode Pillow, render pillow, teacher memory contiguous" in out
    assert re.search(r"forward FLOPs \d+\.\d+ GFLOP/view", out)
    assert re.search(r"pipeline +\d+\.\d views/s +\d+\.\d+ TFLOP/s +unknown of peak +\(6 views in", out)  # 3 × 2
    # Two passes by default: the timed one is the second; the first (one-off costs) gets its own line.
    assert re.search(r"\(6 views in \d+\.\d\d s, teacher eager; pass 2 of 2: the shards labelled again, warm\)", out), out
    assert re.search(r"pipeline, pass 1 of 2 +\d+\.\d views/s +\(6 views in \d+\.\d\d s; torch\.compile built 0 "
                     r"graph\(s\)\) / eager \(no compiled figure\) forward = \d+\.\d\d", out), out
    assert re.search(r"bare forward eager +\d+\.\d views/s +\d+\.\d+ TFLOP/s", out)
    assert re.search(r"bare forward compiled +n/a views/s", out)  # CPU: not compiled unless asked
    assert "graphed forward" not in out  # CUDA graphs are for CUDA only
    assert re.search(r"device loop: 2 batches, \d+\.\d ms of wall and \d+\.\d ms of render \+ forward", out)
    assert re.search(r"device loop host work: \d+\.\d ms per batch \(on a CPU: the batch's render and forward", out)
    assert re.search(r"pipeline, steady +\d+\.\d views/s +\(first batch launched → last filed; \d+\.\d\d s before", out)
    assert re.search(r"render alone +n/a +\(render backend pillow: in the decode workers\)", out)
    assert not re.search(r"^render \+ forward", out, re.M)  # no device render to add up
    assert "to issue it" not in out  # on CPU the issue time is the phase's own
    assert re.search(r"pipeline / eager \(no compiled figure\) forward = \d+\.\d\d", out)
    assert "torch.compile during the timed pipeline: 0 graph(s) built" in out  # no compiling here
    # Where the device loop thread's time went: sampled places, the first a line of this repository.
    assert re.search(r"device loop thread, where its wall time went \(\d+ samples .*\n +\d+\.\d %  "
                     r"(labeler|labelstore)/[\w/]+\.py:\d+ ", out), out
    for phase in ("read", "decode", "pin", "decode_wait", "copy", "render", "forward", "result_wait", "file", "write",
                  "device idle"):
        assert re.search(rf"\n  {phase} +\d+\.\d\d s +\d+\.\d %", out), phase


@pytest.mark.timeout(120)
def test_bench_generate_times_the_batched_render_alone_and_the_device_ceiling(data):
    """With the torch renderer (the GPU default) the bench renders one real decoded batch alone and adds it to
    the pipeline's teacher call: the device's ceiling. The profile holds the render's ops too."""
    from pipelines.cli_labels import app

    _, paths = data
    result = CliRunner().invoke(app, ["bench", "generate", "--shards", paths[2], "--model", MODEL, "--batch-size", "4",
                                      "--amp", "none", "--views", "2", "--num-classes", "10", "--topk", "3",
                                      "--device", "cpu", "--decode-workers", "1", "--forward-batches", "2",
                                      "--render-backend", "torch", "--profile-batches", "1", "--compile", "false",
                                      "--passes", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "pass 1 of" not in out and "pass 2 of" not in out  # one pass: it is the timed one
    assert "JPEG decode torchvision (Pillow's pixels), render torch" in out  # decoded pixels for the device render
    render = re.search(r"render alone +(\d+\.\d) views/s +\((\d+\.\d\d) ms per batch", out)
    eager = re.search(r"bare forward eager +(\d+\.\d) views/s", out)
    ceiling = re.search(r"render \+ forward +(\d+\.\d) views/s .*forward = (\d+\.\d\d)", out)
    assert render and eager and ceiling, out
    r, f, c = float(render[1]), float(eager[1]), float(ceiling[1])
    assert float(render[2]) == pytest.approx(1e3 * 4 / r, rel=0.01)  # 4 views per batch
    assert c == pytest.approx(1 / (1 / r + 1 / f), rel=0.01) and c < min(r, f)
    assert "profile of 1 batches (render + forward" in out and "aten::grid_sampler_2d" in out
    assert "render alone, eager" not in out  # measured only next to a compiled render
    none = CliRunner().invoke(app, ["bench", "generate", "--shards", paths[2], "--model", MODEL, "--device", "cpu",
                                    "--passes", "0"])
    assert none.exit_code == 2 and "--passes must be >= 1, got 0" in none.output


@pytest.mark.timeout(60)
def test_generate_cli_rejects_bad_settings_before_work(data, tmp_path):
    from pipelines.cli_labels import app

    root, paths = data
    preset = tmp_path / "p.yaml"
    preset.write_text(f"model: {MODEL}\nnum_classes: 10\nview:\n  scael: [0.5, 1.0]\n")
    base = ["generate", "--shards", paths[0], "--store", str(tmp_path / "l.zarr"), "--name", "x"]
    bad_key = CliRunner().invoke(app, base + ["--config", str(preset)])
    assert bad_key.exit_code == 2 and "unknown key view.scael" in bad_key.output and "p.yaml" in bad_key.output
    bad_type = CliRunner().invoke(app, base + ["--model", MODEL, "--set", "views=many"])
    assert bad_type.exit_code == 2 and "views" in bad_type.output
    missing = CliRunner().invoke(app, ["generate", "--shards", paths[0], "--store", str(tmp_path / "l.zarr")])
    assert missing.exit_code == 2 and "missing settings ['name', 'model']" in missing.output
    random = CliRunner().invoke(app, base + ["--model", MODEL, "--num-classes", "10"])  # no --checkpoint
    assert random.exit_code == 2 and "--random-weights" in random.stderr and "random weights" in random.stderr
    typo = CliRunner().invoke(app, ["generate", "--shards", paths[0].replace("s-", "typo-"), "--shards", paths[0],
                                    "--store", str(tmp_path / "l.zarr"), "--name", "x", "--model", MODEL,
                                    "--random-weights"])
    assert typo.exit_code == 2 and "1 of 2 shard files do not exist" in typo.stderr and "typo-" in typo.stderr
    assert "RANDOM weights" in typo.stderr  # --random-weights: allowed, and said loudly
    glob = CliRunner().invoke(app, ["generate", "--shards", str(root / "s-*.tar"), "--store", str(tmp_path / "l.zarr"),
                                    "--name", "x", "--model", MODEL, "--random-weights"])
    errors = [line for line in glob.output.splitlines() if line.startswith("error")]
    assert glob.exit_code == 2 and "is a glob pattern" in glob.output and len(errors) == 1
    size = CliRunner().invoke(app, base + ["--model", MODEL, "--set", "input_size=64"])
    assert size.exit_code == 2 and "input_size" in size.output and len(size.output.strip().splitlines()) == 1
    gone = CliRunner().invoke(app, ["generate", "--shards", str(root / "nope-{0..1}.tar"), "--store",
                                    str(tmp_path / "l.zarr"), "--name", "x", "--model", MODEL, "--random-weights"])
    assert gone.exit_code == 2 and "2 of 2 shard files do not exist" in gone.output
    assert not (tmp_path / "l.zarr").exists()


def test_num_classes_comes_from_the_checkpoint_when_not_given(data, tmp_path):
    from labeler.teacher_spec import resolve_num_classes

    root, paths = data
    s = settings(root, str(tmp_path / "l.zarr"), [paths[0]], num_classes=None)
    assert resolve_num_classes(None, s.checkpoint) == 10 and labeler_spec_for(s).num_classes == 10  # a 10-class teacher
    assert resolve_num_classes(None, None) == 1000
    assert resolve_num_classes(7, s.checkpoint) == 7  # given: used as is
    torch.save({"blocks.0.weight": torch.zeros(3, 3)}, tmp_path / "headless.pth")
    with pytest.raises(ValueError, match="headless.pth.*give --num-classes"):
        resolve_num_classes(None, str(tmp_path / "headless.pth"))
