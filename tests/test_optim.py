"""AdamW parameter groups (no decay on norms, biases, cls token, pos embedding) and the warmup-prefix cosine."""
import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from trainer.optim import create_optimizer, create_scheduler


@pytest.fixture(scope="module")
def fan():
    from labeler.models import create_token_model
    return create_token_model("fan_test_p4_hybrid_token", num_classes=10)


def groups_by_name(model, optimizer):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: {ids[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def test_no_decay_on_norms_biases_cls_token_and_pos_embedding(fan):
    opt = create_optimizer(fan, OptimConfig(weight_decay=0.05), lr=1e-3)
    groups = groups_by_name(fan, opt)
    no_decay, decay = groups[0.0], groups[0.05]
    assert {"cls_token", "pos_embed.token_projection.weight", "pos_embed.token_projection.bias"} <= no_decay
    assert all(n.endswith(".bias") or fan.get_parameter(n).ndim <= 1 for n in no_decay
               if not n.startswith(("cls_token", "pos_embed")) and not n.endswith("temperature"))
    assert "head.weight" in decay and any(n.endswith("attn.q.weight") for n in decay)
    assert not any("norm" in n and n.endswith("weight") for n in decay)
    assert len(no_decay) + len(decay) == len(list(fan.parameters()))
    assert type(opt).__name__ == "AdamW"


def test_cosine_as_timm_builds_it_per_update_steps():
    """timm's meaning: the warmup is inside `epochs`, cool-down epochs come after at min_lr."""
    opt = create_optimizer(torch.nn.Linear(2, 2), OptimConfig(), lr=1.0)
    cfg = ScheduleConfig(epochs=4, warmup_epochs=2, cooldown_epochs=1, warmup_lr=0.0, min_lr=0.0)
    sched = create_scheduler(opt, cfg, updates_per_epoch=10)
    lrs = []
    for update in range(51):
        sched.step_update(num_updates=update)
        lrs.append(opt.param_groups[0]["lr"])
    assert cfg.total_epochs == 5
    assert lrs[0] == pytest.approx(0.0) and lrs[10] == pytest.approx(0.5)  # linear warmup over 20 updates
    assert lrs[20] == pytest.approx(0.5, abs=1e-6)  # the cosine runs from update 0: half way at update 20
    assert lrs[40] == pytest.approx(0.0, abs=1e-6) and lrs[50] == pytest.approx(0.0, abs=1e-6)  # cool-down


def test_epochs_is_the_total_as_in_timm():
    """epochs=1 with 5 warmup epochs runs one epoch (it ran 16 with warmup + cool-down added around it)."""
    from timm.scheduler import create_scheduler_v2

    cfg = ScheduleConfig(epochs=1, warmup_epochs=5)
    assert cfg.total_epochs == 1
    assert ScheduleConfig(epochs=1, warmup_epochs=5, cooldown_epochs=10).total_epochs == 11  # timm: 1 + 10
    for c in (cfg, ScheduleConfig(epochs=7, warmup_epochs=2, cooldown_epochs=3, warmup_lr=0.01, min_lr=0.001)):
        ours = create_optimizer(torch.nn.Linear(2, 2), OptimConfig(), lr=1.0)
        ref = create_optimizer(torch.nn.Linear(2, 2), OptimConfig(), lr=1.0)
        sched = create_scheduler(ours, c, updates_per_epoch=4)
        # timm's train.py defaults: warmup inside the cosine; it reports the epochs it will run
        ref_sched, timm_epochs = create_scheduler_v2(
            ref, "cosine", num_epochs=c.epochs, warmup_epochs=c.warmup_epochs, warmup_lr=c.warmup_lr, min_lr=c.min_lr,
            cooldown_epochs=c.cooldown_epochs, step_on_epochs=False, updates_per_epoch=4)
        assert timm_epochs == c.total_epochs
        for update in range(4 * c.total_epochs):
            sched.step_update(num_updates=update)
            ref_sched.step_update(num_updates=update)
            assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"])


def test_fused_step_where_torch_has_one():
    """optim.fused: auto keeps timm's default off the GPU; true asks torch for its fused step (CPU too) and
    gives the same update as the default; an optimiser without one is refused by name."""
    from trainer.errors import TrainConfigError

    def step(cfg):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        opt = create_optimizer(lin, cfg, lr=0.1)
        lin(torch.ones(2, 4)).square().sum().backward()
        opt.step()
        return opt, lin.weight.detach()

    auto, w_auto = step(OptimConfig())
    fused, w_fused = step(OptimConfig(fused=True))
    assert not auto.defaults.get("fused") and fused.defaults["fused"] is True
    torch.testing.assert_close(w_fused, w_auto)
    assert not step(OptimConfig(fused=False))[0].defaults.get("fused")
    with pytest.raises(TrainConfigError, match="optim.fused=true: optimiser 'lamb'"):
        step(OptimConfig(name="lamb", fused=True))
    with pytest.raises(TrainConfigError, match="optim.fused"):
        OptimConfig(fused="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_by_default_on_a_gpu():
    opt = create_optimizer(torch.nn.Linear(4, 3).cuda(), OptimConfig(), lr=0.1)
    assert opt.defaults["fused"] is True


def test_cudnn_times_its_algorithms_on_cuda_only():
    """Fixed-shape hot loops ask cuDNN to keep the fastest convolution per shape; the CPU setting is left alone."""
    from labeler.device import prefer_fastest_convolutions

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        prefer_fastest_convolutions("cpu")
        assert torch.backends.cudnn.benchmark is False
        prefer_fastest_convolutions(torch.device("cuda", 0))  # sets the flag; needs no GPU to do so
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
