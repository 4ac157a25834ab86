"""Training loop: learns a tiny task, resumes exactly, stops cleanly on NaN loss and on SIGTERM."""
import json
import os
import signal

import pytest
import torch

from train_toy import ToySource, ToyTokenModel, make_targets
from trainer.checkpoint import EXPORT, LAST, load_checkpoint_file
from pipelines.config import load_config
from trainer.config import TrainConfig
from trainer.loop import NonFiniteLoss, train
from trainer.losses import student_loss

torch.set_num_threads(1)


def config(epochs=2, **sets):
    base = {"schedule.epochs": epochs, "schedule.warmup_epochs": 1, "schedule.cooldown_epochs": 0,
            "optim.lr": 0.02, "optim.lr_base_batch": 16, "optim.weight_decay": 0.01, "data.batch_size": 16,
            "run.amp": "none", "run.ema_decay": 0.9, "run.log_every": 1, "run.device": "cpu",
            "run.tensorboard": False, "run.progress_bar": False, "model.channels_last": False,
            "model.name": "toy"}
    base.update(sets)
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def loss_fn(cls_logits, token_logits, cls_target, token_target):
    return student_loss(cls_logits, token_logits, cls_target, token_target, beta=1.0)


def run(tmp_path, cfg, source, targets=make_targets, resume=None, seed=0):
    torch.manual_seed(seed)
    model = ToyTokenModel()
    return train(model=model, arch="toy", cfg=cfg, out_dir=tmp_path, epoch_batches=source.epoch_batches,
                 make_targets=targets, compute_loss=loss_fn, steps_per_epoch=source.shards, resume=resume)


def records(tmp_path, kind="train"):
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_loss_decreases_on_a_learnable_task(tmp_path):
    cfg = config(epochs=8, **{"schedule.warmup_epochs": 1})  # 8 epochs in all (timm: warmup inside)
    result = run(tmp_path, cfg, ToySource(shards=6))
    losses = [r["loss"] for r in records(tmp_path)]
    assert result.status == "finished" and len(losses) == 48
    assert sum(losses[-6:]) / 6 < 0.6 * sum(losses[:6]) / 6, losses
    assert (tmp_path / LAST).exists() and (tmp_path / EXPORT).exists()
    export = torch.load(tmp_path / EXPORT, weights_only=True)
    assert set(export["state_dict"]) == set(export["state_dict_ema"])  # what `generate --checkpoint` loads


@pytest.mark.parametrize("grouped", [False, True])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, grouped):
    if grouped:  # checkpoints copied as on a GPU: one buffer per part and dtype, its tensors views of it
        monkeypatch.setattr("trainer.checkpoint_writer.GROUPED_DEVICES", ("cpu",))
    cfg = config(epochs=3, **{"optim.clip_grad": 1.0})
    full = run(tmp_path / "full", cfg, ToySource())
    # Interrupt in the middle of epoch 1 (after update 6 of 12 (3 epochs, warmup included), at a shard boundary) by a stop request.
    calls = {"n": 0}

    def stopping_targets(batch, device, step):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns it into a checkpoint + return
        return make_targets(batch, device, step)

    part = run(tmp_path / "part", cfg, ToySource(), targets=stopping_targets)
    assert part.status == "stopped" and part.global_update == 6
    ck = load_checkpoint_file(tmp_path / "part" / LAST)
    assert ck["epoch"] == 1 and ck["data_position"] == {"steps": 2, "ranks": [{"shards_done": 2}]}
    resumed = run(tmp_path / "part", cfg, ToySource(), resume=tmp_path / "part" / LAST, seed=123)
    assert resumed.status == "finished" and resumed.global_update == full.global_update == 12
    a, b = load_checkpoint_file(full.last_checkpoint), load_checkpoint_file(resumed.last_checkpoint)
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert resumed.last_loss == full.last_loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config(epochs=3)
    calls = {"n": 0}

    def poisoned(batch, device, step):
        calls["n"] += 1
        images, cls_t, tok_t = make_targets(batch, device, step)
        if calls["n"] == 7:  # epoch 1, step 3
            images = images * float("nan")
        return images, cls_t, tok_t

    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step 2.*last good checkpoint is kept at .*last\.pth"):
        run(tmp_path, cfg, ToySource(), targets=poisoned)
    ck = load_checkpoint_file(tmp_path / LAST)
    assert ck["epoch"] == 1 and ck["global_update"] == 4  # end of epoch 0: untouched by the NaN step
    assert all(torch.isfinite(t).all() for t in ck["state_dict"].values())
    assert records(tmp_path, "stop")


def test_nan_in_the_first_epoch_says_no_checkpoint_yet(tmp_path):
    def poisoned(batch, device, step):
        images, cls_t, tok_t = make_targets(batch, device, step)
        return images, cls_t * float("inf"), tok_t

    with pytest.raises(NonFiniteLoss, match="none written yet"):
        run(tmp_path, config(), ToySource(), targets=poisoned)
    assert not (tmp_path / LAST).exists()


def test_accumulation_bf16_autocast_and_csv_metrics(tmp_path):
    cfg = config(epochs=1, **{"optim.accumulation_steps": 2, "run.amp": "bf16", "run.metrics_format": "csv",
                              "schedule.warmup_epochs": 0, "model.channels_last": True})
    result = run(tmp_path, cfg, ToySource(shards=5))
    assert result.global_update == 3  # 5 micro-batches, accumulation 2: the epoch's remainder still updates
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("kind,epoch,update,loss") and len(rows) == 1 + 2 + 1  # header, 2 full updates, the epoch line


def test_fp16_uses_a_grad_scaler_and_resume_restores_it(tmp_path):
    cfg = config(epochs=1, **{"run.amp": "fp16", "schedule.warmup_epochs": 0})
    run(tmp_path, cfg, ToySource(shards=2))
    assert load_checkpoint_file(tmp_path / LAST)["scaler"]["scale"] > 0


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    from trainer.checkpoint import atomic_save

    atomic_save({"a": torch.ones(2)}, tmp_path / "ck.pth")
    with pytest.raises(Exception):
        atomic_save({"a": lambda: None}, tmp_path / "ck.pth")  # cannot be pickled: fails mid-write
    assert torch.load(tmp_path / "ck.pth", weights_only=True)["a"].equal(torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temp file left behind


def test_resume_into_another_model_or_from_a_bad_file_is_a_clear_error(tmp_path):
    from trainer.errors import TrainCheckpointError

    run(tmp_path, config(epochs=1, **{"schedule.warmup_epochs": 0}), ToySource(shards=1))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainCheckpointError, match="junk.pth cannot be read"):
        run(tmp_path / "b", config(), ToySource(), resume=tmp_path / "junk.pth")

    class Wider(ToyTokenModel):
        def __init__(self):
            super().__init__(dim=48)

    with pytest.raises(TrainCheckpointError, match="does not fit") as e:  # one line, not every key of the model
        train(model=Wider(), arch="toy", cfg=config(), out_dir=tmp_path / "c", epoch_batches=ToySource().epoch_batches,
              make_targets=make_targets, compute_loss=loss_fn, steps_per_epoch=4, resume=tmp_path / LAST)
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


def test_resume_refuses_another_model_batch_size_or_data_in_one_line(tmp_path):
    from trainer.checkpoint import resume_mismatches
    from trainer.errors import TrainCheckpointError

    data = {"shards": ["a-0.tar", "a-1.tar"], "num_samples": 64}
    cfg = config(epochs=1, **{"schedule.warmup_epochs": 0})
    torch.manual_seed(0)
    train(model=ToyTokenModel(), arch="toy", cfg=cfg, out_dir=tmp_path, epoch_batches=ToySource(shards=1).epoch_batches,
          make_targets=make_targets, compute_loss=loss_fn, steps_per_epoch=1, data_identity=data)

    def resume(arch="toy", data=data, **sets):
        torch.manual_seed(0)
        with pytest.raises(TrainCheckpointError) as e:
            train(model=ToyTokenModel(), arch=arch, cfg=config(epochs=2, **{"schedule.warmup_epochs": 0, **sets}),
                  out_dir=tmp_path / "r", epoch_batches=ToySource().epoch_batches, make_targets=make_targets,
                  compute_loss=loss_fn, steps_per_epoch=4, resume=tmp_path / LAST, data_identity=data)
        message = str(e.value)
        assert "\n" not in message and len(message) < 400, message
        return message

    assert "model 'toy' → 'other'" in resume(arch="other")
    assert "data.batch_size 16 → 8" in resume(**{"data.batch_size": 8})
    assert "shards 2 → 1 (missing: a-1.tar)" in resume(data={"shards": ["a-0.tar"], "num_samples": 32})
    assert "samples 64 → 60" in resume(data={"shards": ["a-0.tar", "a-1.tar"], "num_samples": 60})
    # What may change: more epochs, another learning rate, the log cadence.
    ck = load_checkpoint_file(tmp_path / LAST)
    ok = config(epochs=5, **{"schedule.warmup_epochs": 0, "optim.lr": 0.1, "run.log_every": 3}).to_dict()
    assert resume_mismatches(ck, arch="toy", config=ok, data=data) == []
    mid = {**ck, "data_position": {"steps": 1, "ranks": [{}, {}]}, "world_size": 2}
    assert "processes 2 → 1" in resume_mismatches(mid, arch="toy", config=ok, data=data)[0]


def test_begin_step_marks_a_cuda_graph_step_only_in_reduce_overhead(monkeypatch):
    from trainer.loop import begin_step

    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    begin_step("default")
    begin_step("max-autotune")
    assert calls == []
    begin_step("reduce-overhead")
    assert calls == [1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_compile_trains_and_checkpoints_plain_keys(tmp_path, monkeypatch):
    """model.compile with compile_mode reduce-overhead (CUDA graphs on a GPU; the plain compile on this CPU):
    trains, marks every step for the graphs, and checkpoints the model's own keys."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    result = run(tmp_path, config(epochs=1, **{"model.compile": True, "model.compile_mode": "reduce-overhead",
                                               "schedule.warmup_epochs": 0}), ToySource(shards=3))
    assert result.status == "finished" and result.global_update == 3 and len(marks) == 3
    keys = load_checkpoint_file(tmp_path / LAST)["state_dict"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


@pytest.mark.parametrize("name, grid", [("vit_tiny_patch16_224", (4, 4)), ("resnet18", (2, 2)),
                                        ("fan_test_p4_hybrid_token", (4, 4))])
def test_the_student_is_built_for_the_store_view_size(name, grid):
    """A ViT student on a 64-px store gets img_size=64 (its position embedding), models without one build as usual."""
    from labeler.models import token_grid
    from trainer.run_stage import build_model

    cfg = load_config(TrainConfig, None, [f"model.name={name}", "model.num_classes=10", "model.drop_path_rate=0.0"])
    model = build_model(cfg, (64, 64)).eval()
    assert token_grid(model, (64, 64)) == grid
    with torch.no_grad():
        cls_logits, tokens = model.forward_tokens(torch.zeros(1, 3, 64, 64)) if hasattr(model, "forward_tokens") \
            else model(torch.zeros(1, 3, 64, 64))
    assert cls_logits.shape == (1, 10) and tokens.shape == (1, grid[0] * grid[1], 10)


def test_loss_health_names_the_first_non_finite_loss_across_checks():
    """The device-side flag points into the notes since the last check (no host copy per step)."""
    from trainer.distributed import DistInfo
    from trainer.loop import LossHealth

    reports = []
    health = LossHealth(torch.device("cpu"), DistInfo(), lambda *where: reports.append(where))
    for step in range(3):
        health.note(torch.tensor(1.0), 0, step, step)
    health.check()
    assert reports == [] and health.where == []
    health.note(torch.tensor(2.0), 1, 0, 3)
    health.note(torch.tensor(float("inf")), 1, 1, 4)
    health.note(torch.tensor(float("nan")), 1, 2, 5)
    health.check()
    assert reports == [(1, 1, 4)]
