"""Checkpoints written in the background: a frozen host copy, one write at a time, errors surface, the loop waits
for its last write (trainer/checkpoint_writer.py)."""
import threading
import time

import pytest
import torch

import trainer.checkpoint_writer as checkpoint_writer
from test_train_loop import config, run
from train_toy import ToySource
from trainer.checkpoint import LAST, atomic_save, load_checkpoint_file
from trainer.checkpoint_writer import CheckpointWriter, host_copy
from trainer.errors import TrainCheckpointError

torch.set_num_threads(1)


def test_host_copy_is_frozen_at_the_moment_it_is_taken():
    live = {"w": torch.ones(3), "groups": [{"lr": 0.1, "betas": (0.9, 0.999)}], "state": {0: {"step": torch.tensor(2.0)}},
            "name": "fan", "epoch": 4, "none": None}
    copy = host_copy(live)
    live["w"].add_(1)
    live["state"][0]["step"].add_(1)
    live["groups"][0]["lr"] = 0.5
    assert torch.equal(copy["w"], torch.ones(3)) and float(copy["state"][0]["step"]) == 2.0
    assert copy["groups"][0]["lr"] == 0.1 and copy["groups"][0]["betas"] == (0.9, 0.999)
    assert (copy["name"], copy["epoch"], copy["none"]) == ("fan", 4, None)


def _slow_save(monkeypatch, seconds, started=None):
    def slow(obj, path):
        if started is not None:
            started.set()
        time.sleep(seconds)
        atomic_save(obj, path)
    monkeypatch.setattr(checkpoint_writer, "atomic_save", slow)


def test_writes_in_the_background_one_at_a_time(tmp_path, monkeypatch):
    started = threading.Event()
    _slow_save(monkeypatch, 0.3, started)
    writer = CheckpointWriter()
    t0 = time.perf_counter()
    writer.submit({"v": torch.tensor(1)}, tmp_path / "ck.pth")
    assert time.perf_counter() - t0 < 0.2 and started.wait(5) and writer.busy  # the caller went on at once
    writer.submit({"v": torch.tensor(2)}, tmp_path / "ck.pth")  # waits for the first write, then starts its own
    assert time.perf_counter() - t0 >= 0.3
    writer.wait()
    assert not writer.busy and int(torch.load(tmp_path / "ck.pth", weights_only=True)["v"]) == 2
    (s1, d1), (s2, d2) = writer.writes  # when each write ran, for a bench to read against its window
    assert d1 >= 0.3 and d2 >= 0.3 and s2 >= s1 + d1 - 1e-3


def test_the_file_holds_the_state_at_submit_time(tmp_path, monkeypatch):
    _slow_save(monkeypatch, 0.2)
    live = {"w": torch.zeros(4), "opt": {"state": {0: {"exp_avg": torch.ones(2)}}}}
    writer = CheckpointWriter()
    writer.submit(live, tmp_path / "ck.pth")
    live["w"].add_(5)  # training goes on at once
    live["opt"]["state"][0]["exp_avg"].mul_(3)
    writer.wait()
    saved = torch.load(tmp_path / "ck.pth", weights_only=True)
    assert torch.equal(saved["w"], torch.zeros(4)) and torch.equal(saved["opt"]["state"][0]["exp_avg"], torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_tensors_are_copied_before_later_steps_change_them(tmp_path):
    conv = torch.randn(64, 32, 3, 3, device="cuda").to(memory_format=torch.channels_last)
    big = torch.randn(4096, 4096, device="cuda")
    want_conv, want_big = conv.cpu(), big.cpu()
    writer = CheckpointWriter()
    writer.submit({"conv": conv, "big": big}, tmp_path / "ck.pth")
    for _ in range(20):  # later "steps" queued behind the copies change the tensors in place
        big.mul_(1.5).add_(1.0)
        conv.zero_()
    writer.wait()
    saved = torch.load(tmp_path / "ck.pth", weights_only=True)
    assert torch.equal(saved["big"], want_big) and torch.equal(saved["conv"], want_conv)
    assert saved["conv"].is_contiguous(memory_format=torch.channels_last)  # the layout travels as it was


def test_a_failed_write_is_raised_naming_the_file_and_keeps_the_previous_one(tmp_path):
    writer = CheckpointWriter()
    writer.submit({"v": torch.tensor(1)}, tmp_path / "ck.pth")
    writer.wait()
    writer.submit({"v": lambda: None}, tmp_path / "ck.pth")  # cannot be pickled: fails mid-write
    with pytest.raises(TrainCheckpointError, match=r"writing checkpoint .*ck\.pth failed"):
        writer.wait()
    assert int(torch.load(tmp_path / "ck.pth", weights_only=True)["v"]) == 1
    writer.wait()  # the error is reported once


def test_training_returns_only_with_its_last_checkpoint_on_disk(tmp_path, monkeypatch):
    _slow_save(monkeypatch, 0.4)
    result = run(tmp_path, config(epochs=2), ToySource())
    assert result.status == "finished"
    ck = load_checkpoint_file(tmp_path / LAST)  # complete: the loop waited for the background write
    assert ck["epoch"] == 2 and ck["global_update"] == result.global_update
    assert len(result.checkpoint_writes) == 2 and all(seconds >= 0.4 for _, seconds in result.checkpoint_writes)


def test_training_reports_a_failed_background_write(tmp_path, monkeypatch):
    def failing(obj, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_writer, "atomic_save", failing)
    with pytest.raises(TrainCheckpointError, match=r"last\.pth failed: OSError: .*No space left on device"):
        run(tmp_path, config(epochs=2), ToySource())


def test_a_nan_stop_is_reported_even_when_the_last_write_failed(tmp_path, monkeypatch):
    from test_train_loop import records
    from train_toy import make_targets
    from trainer.loop import NonFiniteLoss

    def failing(obj, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_writer, "atomic_save", failing)
    calls = {"n": 0}

    def poisoned(batch, device, step):
        calls["n"] += 1
        images, cls_t, tok_t = make_targets(batch, device, step)
        return (images * float("nan") if calls["n"] == 7 else images), cls_t, tok_t

    with pytest.raises(NonFiniteLoss, match="epoch 1"):  # the NaN is what stops the run, not the failed write
        run(tmp_path, config(epochs=3), ToySource(), targets=poisoned)
    assert records(tmp_path, "stop")


def test_device_tensors_share_one_buffer_per_part_and_dtype(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint_writer, "GROUPED_DEVICES", ("cpu",))  # the GPU path, run on host tensors
    conv = torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last)
    tied = torch.arange(6.0)
    live = {"state_dict": {"conv": conv, "bias": torch.zeros(64), "count": torch.tensor(7), "tied": tied,
                           "tied_again": tied, "empty": torch.empty(0), "strided": torch.arange(10.0)[::2]},
            "optimizer": {"state": {0: {"exp_avg": torch.ones(5), "step": torch.tensor(3.0)}}}, "epoch": 3}
    copy = host_copy(live)
    weights = copy["state_dict"]
    for name, value in live["state_dict"].items():
        assert torch.equal(weights[name], value) and weights[name].dtype == value.dtype, name
    assert weights["conv"].stride() == conv.stride() and weights["tied"] is weights["tied_again"]
    conv.add_(1)  # training goes on: the copy keeps the values of its moment
    assert not torch.equal(weights["conv"], conv)

    def storage(t):
        return t.untyped_storage().data_ptr()

    assert storage(weights["conv"]) == storage(weights["bias"]) == storage(weights["tied"])  # one float32 buffer
    assert storage(weights["count"]) != storage(weights["bias"])  # int64: its own
    assert storage(weights["strided"]) != storage(weights["bias"])  # a strided view: copied on its own
    assert storage(copy["optimizer"]["state"][0]["exp_avg"]) != storage(weights["bias"])  # another part
    # A part saved alone (as export_for_labeling keeps the weights only) holds its own bytes, not the others'.
    torch.save(copy["optimizer"], tmp_path / "optimizer.pth")
    assert (tmp_path / "optimizer.pth").stat().st_size < 64 * 32 * 9 * 4 // 4
    atomic_save(copy, tmp_path / "all.pth")
    loaded = torch.load(tmp_path / "all.pth", weights_only=True)
    assert torch.equal(loaded["state_dict"]["conv"], weights["conv"]) and loaded["epoch"] == 3
