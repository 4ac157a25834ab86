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


def test_cosine_with_warmup_prefix_and_per_update_steps():
    opt = create_optimizer(torch.nn.Linear(2, 2), OptimConfig(), lr=1.0)
    sched = create_scheduler(opt, ScheduleConfig(epochs=4, warmup_epochs=2, cooldown_epochs=1, warmup_lr=0.0,
                                                 min_lr=0.0), updates_per_epoch=10)
    lrs = []
    for update in range(71):
        sched.step_update(num_updates=update)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.0) and lrs[10] == pytest.approx(0.5)  # linear warmup over 20 updates
    assert lrs[20] == pytest.approx(1.0)  # the cosine starts at the full lr after the warmup prefix
    assert lrs[40] == pytest.approx(0.5, abs=1e-6)  # half way through the 40-update cosine
    assert lrs[60] == pytest.approx(0.0, abs=1e-6) and lrs[70] == pytest.approx(0.0, abs=1e-6)  # cool-down
