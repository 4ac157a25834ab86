"""Stage 1 → generate → student → eval end to end on tiny demo shards (CPU, fan_test 64 px), through the CLI.

Also the bad inputs that need a real store: another shard list, another class count, a missing
labeler name, an unknown config key, and a corrupt image mid-epoch (skipped and counted, not a crash).
"""
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli_train import app

PRESET = str(Path(__file__).parents[1] / "pipelines" / "presets" / "cpu_smoke.yaml")
FAST = ["--set", "schedule.max_steps_per_epoch=2", "--set", "schedule.epochs=1", "--set", "schedule.warmup_epochs=0", "--set", "data.batch_size=16", "--set", "run.progress_bar=false"]
runner = CliRunner()


def label_shards(urls, store, checkpoint):
    """`stl-labels generate` without starting Ray: the generate job's own pieces, called in-process."""
    from labeler.work_unit import ShardLabeler
    from labelstore.shard_format import count_samples
    from pipelines.generate import GenerateSettings, labeler_spec_for, open_store

    settings = GenerateSettings(shards=list(urls), store=str(store), name="tl", model="fan_test_p4_hybrid_token",
                                checkpoint=str(checkpoint), num_classes=10, views=2, topk=3, rows_per_chunk=16,
                                amp="none", batch_size=64, device="cpu")
    st, _ = open_store(settings, labeler_spec_for(settings))
    st.register_shards([(u, count_samples(u)) for u in urls])
    worker = ShardLabeler(st.path, "tl", settings.worker_settings())
    assert all(worker(s.index).ok for s in st.shards)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipelines.demo.data import DemoDataSpec, write_demo_data

    root = tmp_path_factory.mktemp("e2e")
    write_demo_data(root / "demo", DemoDataSpec(num_train=64, num_val=32, num_val_corrupt=16, samples_per_shard=32,
                                                corruptions=("gaussian_noise", "contrast"), severities=(1, 3)))
    train = sorted(str(p) for p in (root / "demo" / "train").glob("*.tar"))
    r = runner.invoke(app, ["labeler", "--config", PRESET, "--shards", train[0], "--shards", train[1],
                            "--out", str(root / "tl"), *FAST])
    assert r.exit_code == 0, r.output
    assert (root / "tl" / "model_ema.pth").exists() and (root / "tl" / "config.yaml").exists()
    label_shards(train, root / "labels.zarr", root / "tl" / "model_ema.pth")
    return {"root": root, "train": train}


def student(world, out, *extra, shards=None, labeler="tl"):
    shard_args = [a for s in (shards or world["train"]) for a in ("--shards", s)]
    return runner.invoke(app, ["student", "--config", PRESET, *shard_args, "--labels", str(world["root"] / "labels.zarr"),
                               "--labeler", labeler, "--out", str(out), *FAST, *extra])


@pytest.mark.timeout(300)
def test_stage1_generate_student_eval(world, tmp_path):
    r = student(world, tmp_path / "st")
    assert r.exit_code == 0, r.output
    metrics = [json.loads(line) for line in (tmp_path / "st" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert len(train) == 2 and all(m["loss_token"] > 0 for m in train)  # Eq. 5's token term is in the loss
    root = world["root"] / "demo"
    r = runner.invoke(app, ["eval", "--config", PRESET, "--checkpoint", str(tmp_path / "st" / "last.pth"),
                            "--shards", str(root / "val" / "val-000000.tar"), "--imagenet-c", str(root / "val-c"),
                            "--json", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["clean"]["samples"] == 32 and 0 <= report["clean"]["top1"] <= 1
    assert report["imagenet_c"]["corruptions"] == ["contrast", "gaussian_noise"] and report["imagenet_c"]["mce"] is None
    assert "top1" in r.output and "imagenet-c" in r.output
    # The slim EMA export (what generate loads) evaluates too: model and classes are read from it.
    r = runner.invoke(app, ["eval", "--config", PRESET, "--checkpoint", str(tmp_path / "st" / "model_ema.pth"),
                            "--shards", str(root / "val" / "val-000000.tar")])
    assert r.exit_code == 0 and "clean" in r.output, r.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_from_the_cli_continues(world, tmp_path):
    assert student(world, tmp_path / "st").exit_code == 0
    r = student(world, tmp_path / "st", "--resume", str(tmp_path / "st" / "last.pth"), "--set", "schedule.epochs=2")
    assert r.exit_code == 0, r.output
    assert "done: 2 epochs, 4 updates" in r.output  # 1 epoch done + 1 more, 2 steps each


@pytest.mark.parametrize("args, message", [
    ([], "has no labeler 'nope'"),
    (["--set", "model.num_classes=7"], "classes"),
    (["--set", "optim.lrr=1"], "optim.lrr"),
])
def test_bad_inputs_fail_before_training_with_a_clear_message(world, tmp_path, args, message):
    r = student(world, tmp_path / "st", *args, labeler="nope" if not args else "tl")
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "st" / "last.pth").exists()


def test_shards_that_were_not_labelled_are_refused(world, tmp_path):
    other = tmp_path / "other-000000.tar"
    shutil.copy(world["train"][0], other)
    r = student(world, tmp_path / "st", shards=[str(other)])
    assert r.exit_code == 2 and "other-000000.tar" in r.output, r.output


@pytest.mark.timeout(300)
def test_corrupt_image_mid_epoch_is_skipped_and_counted(world, tmp_path):
    # Same shard and keys as labelled, but one JPEG's bytes are garbage now.
    src, bad = world["train"][0], tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(src) as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(bad / Path(src).name, "w") as tout:
        for m, data in members:
            data = b"not a jpeg" if m.name == victim else data
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    # The store knows shards by URL: label the copied shards into a fresh store, then corrupt.
    good = bad / "clean"
    good.mkdir()
    shutil.copy(src, good / Path(src).name)
    label_shards([str(good / Path(src).name)], tmp_path / "labels.zarr", world["root"] / "tl" / "model_ema.pth")
    shutil.copy(bad / Path(src).name, good / Path(src).name)
    r = runner.invoke(app, ["student", "--config", PRESET, "--shards", str(good / Path(src).name),
                            "--labels", str(tmp_path / "labels.zarr"), "--labeler", "tl", "--out", str(tmp_path / "st"),
                            "--set", "data.batch_size=16", "--set", "schedule.max_steps_per_epoch=null",
                            "--set", "schedule.warmup_epochs=0", "--set", "schedule.epochs=1",
                            "--set", "run.progress_bar=false", "--set", "data.shuffle_buffer=0"])
    assert r.exit_code == 0, r.output
    epochs = [json.loads(x) for x in (tmp_path / "st" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_samples"] for m in epochs if m["kind"] == "epoch"] == [1]
    assert "1 unreadable samples skipped" in r.output


@pytest.mark.timeout(300)
def test_bench_prints_all_figures_and_ratios(world):
    shard_args = [a for s in world["train"] for a in ("--shards", s)]
    r = runner.invoke(app, ["bench", *shard_args, "--labels", str(world["root"] / "labels.zarr"), "--labeler", "tl",
                            "--steps", "1", "--repeats", "1", "--batch-size", "8", "--seconds", "1", "--warmup", "1",
                            "--workers", "1", "--profile-steps", "2", "--loader-seconds", "0.5"])
    assert r.exit_code == 0, r.output
    # Each loader alone reads for at least --loader-seconds (epoch after epoch), and says how many images.
    spans = re.findall(r"images/s  \((\d+) images in (\d+\.\d) s per run, 1 worker, [\d.]+ per worker\)", r.output)
    assert len(spans) == 2 and all(int(n) >= 32 and float(s) >= 0.5 for n, s in spans), r.output
    for text in ("in the data workers, JPEG decode Pillow",  # the CPU path's workers decode for Pillow's render
                 "measured: (b) stored token labels end to end", "profile of 2 step-only steps, (b) stored",
                 "Self CPU time total", "measured: step only", "end to end (real loop)",
                 "loader wait", "epoch starts", "step only", "(a) no token labels", "(b) stored token labels",
                 "(c) online teacher", "replay loader (ours)", "timm train transform", "ratio b/a end to end",
                 "ratio b/c end to end", "ratio b/a step only", "ratio b end to end / step only", "ratio replay/timm",
                 "host ms per step", "device behind", "host ms/step: wait", "ms/step on a CPU",
                 "the loop thread in (b) stored token labels end to end, where its wall time went"):
        assert text in r.output
    rows = [line.split() for line in r.output.splitlines() if line.strip().startswith(("(a)", "(b)", "(c)"))]
    assert len(rows) == 6 and all(float(row[4]) > 0 for row in rows[:3]), r.output  # end-to-end img/s measured
    assert "img/s without its" in r.output  # the epoch-end checkpoints of these short epochs, taken out
    # Where each step's host time went: one row per phase and variant, with numbers, the lag n/a on a CPU.
    rows = [line for line in r.output.splitlines() if line.strip().startswith(("end to end, (", "step only, ("))]
    assert len(rows) == 12, r.output  # the host split, then the loop thread's split
    splits, threads = rows[:6], rows[6:]
    assert all(line.rstrip().endswith("n/a (CPU)") for line in splits), r.output
    # The loop thread's wall per step: on a CPU (part of the wall), waiting for a core, asleep, other threads.
    assert "the loop thread's wall ms per step: on a CPU, runnable but waiting for a free core" in r.output
    for line in threads:
        wall, cpu, queue, asleep, others = line[43:].split()
        assert float(wall) > 0 and 0 < float(cpu) <= float(wall) + 0.1 and float(others) >= 0, r.output
        assert queue == "-" or float(queue) >= 0, r.output
    # End to end counts the loop's pause for each epoch-end checkpoint in its window (2 epochs began in it).
    assert all(re.search(r" (\d+ × \d+ ms|none) ", line) for line in splits[:3]), r.output
    numbers = [line[43:].split()[:3] for line in splits]  # after the 40-character name: wait, targets, rest
    assert all(float(targets) > 0 and float(rest) > 0 for _, targets, rest in numbers), r.output
    stacks = r.output.split("where its wall time went")[1].splitlines()[1:4]
    assert all(re.match(r" +\d+\.\d %  (trainer|labeler|labelstore|pipelines)/[\w/]+\.py:\d+ ", line) for line in stacks), \
        r.output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_bench_compiles_once_and_prints_every_row(world):
    """--compile: one student (with its loss) and one teacher compile (printed with their times and mode), reused
    by all three variants and both phases: no recompile but the expected two, every row printed. The mode is reduce-overhead (CUDA graphs on a
    GPU; on this CPU the same compile without graphs), so the mode and the step marks travel the whole way."""
    import logging

    import torch._logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    torch._dynamo.reset()  # dynamo's caches are per process: count only this bench's compiles
    torch._logging.set_logs(recompiles=True)
    handler = Keep()
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        shard_args = [a for s in world["train"] for a in ("--shards", s)]
        r = runner.invoke(app, ["bench", *shard_args, "--labels", str(world["root"] / "labels.zarr"), "--labeler", "tl",
                                "--steps", "1", "--repeats", "1", "--batch-size", "8", "--seconds", "1", "--warmup", "1",
                                "--workers", "1", "--compile", "--compile-mode", "reduce-overhead",
                                "--device", "cpu", "--loader-seconds", "0"])
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
    assert r.exit_code == 0, r.output
    assert "torch.compile (mode reduce-overhead), once for every variant and phase: student (forward + backward)" \
        in r.output
    # CUDA graph trees' own counters, 0 or not: on this CPU torch.compile declines the graphs, and says so.
    assert re.search(r"torch.compile's CUDA graphs: cudagraph_recorded_non_static_inputs \d+, cudagraph_skips [1-9]",
                     r.output), r.output
    rows = [line.split() for line in r.output.splitlines() if line.strip().startswith(("(a)", "(b)", "(c)"))]
    assert len(rows) == 6 and all(float(row[4]) > 0 for row in rows[:3]), r.output
    # The teacher shares TokenForward.forward's code with the student: its no-grad compile is a second cache
    # entry, logged as a recompile; any recompile but these two would be a variant or phase compiling again.
    recompiles = [m for m in records if "Recompiling" in m]
    # The loss (compiled with the model) takes no token target in (a): its second graph, the other recompile.
    assert len(recompiles) == 2, recompiles
    assert "grad_mode" in recompiles[0] and "forward" in recompiles[0], recompiles
    assert "args[3]" in recompiles[1] and "NoneType" in recompiles[1], recompiles


@pytest.mark.timeout(400)
def test_student_resume_mid_epoch_equals_the_uninterrupted_run(world, tmp_path):
    """Exact resume on the real data path (loader with 2 workers and a shuffle buffer, RandAugment, TargetBuilder,
    drop path, FAN test model): after SIGTERM mid-epoch, and from a periodic checkpoint as a SIGKILL leaves it,
    `--resume` ends with the weights of the uninterrupted run, bit for bit, and the same number of updates."""
    import os
    import signal
    from functools import partial

    import torch

    from labeler.models import token_grid
    from pipelines.config import load_config
    from trainer.checkpoint import LAST, load_checkpoint_file
    from trainer.config import TrainConfig
    from trainer.loader import build_student_loader
    from trainer.loop import train
    from trainer.losses import student_loss
    from trainer.run_stage import build_model, data_identity, loader_epochs
    from trainer.target_builder import TargetBuilder

    cfg = load_config(TrainConfig, PRESET, ["data.batch_size=12", "data.workers=2", "data.shuffle_buffer=16",
                                            "schedule.warmup_epochs=0", "schedule.epochs=2",
                                            "schedule.max_steps_per_epoch=null", "run.progress_bar=false",
                                            "model.drop_path_rate=0.1", "run.checkpoint_every=1"],
                      {"data": {"shards": world["train"]}})

    def run(out, hook=None, resume=None):
        torch.manual_seed(0)
        loader = build_student_loader(cfg.data, labels=world["root"] / "labels.zarr", labeler="tl", num_classes=10,
                                      rank=0, world_size=1)
        model = build_model(cfg)
        builder = TargetBuilder(num_classes=10, data=cfg.data, tokens=cfg.tokens, store_grid=loader.store_grid,
                                student_grid=token_grid(model, loader.input_size), seed=0)
        calls = {"n": 0}

        def targets(batch, device, step):
            calls["n"] += 1
            if hook:
                hook(calls["n"], out)
            return builder(batch, step)

        return train(model=model, arch=cfg.model.name, cfg=cfg, out_dir=out, epoch_batches=loader_epochs(loader),
                     make_targets=targets, compute_loss=partial(student_loss, beta=1.0),
                     steps_per_epoch=loader.batches_per_epoch(1), resume=resume,
                     data_identity=data_identity(loader.stream.urls, loader.num_samples))

    def sigterm_at(n):
        def hook(call, out):
            if call == n:
                os.kill(os.getpid(), signal.SIGTERM)
        return hook

    def snapshot_at(n, to):  # what SIGKILL leaves behind: the periodic checkpoint written before call n
        def hook(call, out):
            if call == n:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / LAST, to)
        return hook

    # 2 shards x 32 samples over 2 workers, batch 12: per epoch each worker gives 12 + 12 + 8 → 6 updates.
    killed = tmp_path / "killed" / LAST
    full = run(tmp_path / "full", hook=snapshot_at(9, killed))
    assert full.status == "finished" and full.global_update == 12
    part = run(tmp_path / "part", hook=sigterm_at(4))  # mid-epoch 0: worker 0 gave 2 batches, worker 1 one
    assert part.status == "stopped" and part.global_update == 4
    position = load_checkpoint_file(tmp_path / "part" / LAST)["data_position"]
    assert position["steps"] == 4 and position["ranks"][0]["taken"] == {"0": 2, "1": 2}, position
    resumed = run(tmp_path / "part", resume=tmp_path / "part" / LAST)
    after_kill = run(killed.parent, resume=killed)  # mid-epoch 1, update 8
    reference = load_checkpoint_file(full.last_checkpoint)
    for result in (resumed, after_kill):
        assert result.status == "finished" and result.global_update == 12  # no replayed or lost update
        got = load_checkpoint_file(result.last_checkpoint)
        for key in ("state_dict", "state_dict_ema"):
            for name, t in reference[key].items():
                assert torch.equal(t, got[key][name]), f"{result.last_checkpoint}: {key}.{name}"


@pytest.mark.timeout(300)
def test_torchrun_two_process_student(world, tmp_path):
    """`torchrun --nproc_per_node 2 stl-train student` (gloo): shards split over ranks, one line printed."""
    import os
    import subprocess
    import sys

    from gloo_ranks import free_port

    stl_train = Path(sys.executable).with_name("stl-train")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(stl_train), "student", "--config", PRESET, *[a for s in world["train"] for a in ("--shards", s)],
           "--labels", str(world["root"] / "labels.zarr"), "--labeler", "tl", "--out", str(tmp_path / "st"),
           "--set", "data.batch_size=16", "--set", "schedule.max_steps_per_epoch=null", "--set", "run.progress_bar=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    # 64 samples in 2 shards, one shard per rank, batch 16: 2 steps per epoch on each rank, 2 epochs.
    assert r.stderr.count("done: 2 epochs, 4 updates") == 1 and "done:" not in r.stdout, r.stdout + r.stderr
    epochs = [json.loads(x) for x in (tmp_path / "st" / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in epochs if m["kind"] == "epoch"] == [2, 4]


def test_a_stopped_run_exits_143(monkeypatch, tmp_path):
    """SIGTERM: the loop writes its checkpoint and returns "stopped"; the command exits non-zero (128 + 15)."""
    import trainer.run_stage
    from trainer.loop import TrainResult

    monkeypatch.setattr(trainer.run_stage, "run_student", lambda cfg, **kw: TrainResult(
        "stopped", 0, 3, tmp_path / "last.pth", None, 1.0))
    r = runner.invoke(app, ["student", "--config", PRESET, "--shards", "x.tar", "--labels", "l.zarr", "--labeler", "tl",
                            "--out", str(tmp_path)])
    # the loop's own log says where the checkpoint is (one end-of-run line); the command only sets the code
    assert r.exit_code == 143 and "Traceback" not in r.output, r.output


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_signals_to_a_real_process_then_resume_match_the_uninterrupted_run(world, tmp_path, sig):
    """`stl-train student` as a process: SIGTERM → checkpoint + exit 143; SIGKILL → the last periodic checkpoint;
    either way `--resume` ends with the uninterrupted run's update count and weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from trainer.checkpoint import load_checkpoint_file

    sets = ["--set", "schedule.epochs=2", "--set", "schedule.max_steps_per_epoch=null", "--set", "data.batch_size=8",
            "--set", "data.workers=2", "--set", "schedule.warmup_epochs=0", "--set", "run.checkpoint_every=1",
            "--set", "run.progress_bar=false"]
    shard_args = [a for s in world["train"] for a in ("--shards", s)]

    def args(out, *extra):
        return ["student", "--config", PRESET, *shard_args, "--labels", str(world["root"] / "labels.zarr"),
                "--labeler", "tl", "--out", str(out), *sets, *extra]

    # Every run a process with the same thread count: float sums must group the same way to compare bit for bit.
    command = [sys.executable, str(Path(sys.executable).with_name("stl-train"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*command, *args(tmp_path / "full")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "done: 2 epochs, 16 updates" in r.stderr, r.stdout + r.stderr
    proc = subprocess.Popen([*command, *args(tmp_path / "part")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    metrics = tmp_path / "part" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == (143 if sig == "SIGTERM" else -signal.SIGKILL), out
    assert "Traceback" not in out, out
    r = subprocess.run([*command, *args(tmp_path / "part", "--resume", str(tmp_path / "part" / "last.pth"))],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "done: 2 epochs, 16 updates" in r.stderr, r.stdout + r.stderr
    a, b = load_checkpoint_file(tmp_path / "full" / "last.pth"), load_checkpoint_file(tmp_path / "part" / "last.pth")
    for key in ("state_dict", "state_dict_ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name}"
