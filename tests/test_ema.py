"""trainer.ema.ModelEma: timm's ModelEmaV3, update for update, with its tensor lists kept between updates."""
from __future__ import annotations

import pytest
import torch
from timm.utils import ModelEmaV3

from trainer.ema import ModelEma


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)  # float buffers and an integer one (num_batches_tracked)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


def train_a_little(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(4, 3, 8, 8, generator=gen)).sum().backward()  # BN statistics and step count move
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
            p.grad = None


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("warmup", [False, True])
def test_updates_equal_timms(warmup):
    torch.manual_seed(0)
    model = Net()
    ours, timms = ModelEma(model, decay=0.9, use_warmup=warmup), ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    for step in range(1, 6):
        train_a_little(model, step)
        ours.update(model, step=step)
        timms.update(model, step=step)
        same_state(ours.module, timms.module)
    assert ours._pairs.usable and int(ours.module.bn.num_batches_tracked) == 5


def test_new_tensors_in_the_model_are_noticed():
    torch.manual_seed(0)
    model = Net()
    ours, timms = ModelEma(model, decay=0.5), ModelEmaV3(model, decay=0.5)
    ours.update(model, step=10)
    timms.update(model, step=10)
    first = ours._pairs
    model.bn.running_mean = torch.full((4,), 3.0)  # a new buffer object, as `.to()` puts there
    with torch.no_grad():
        model.head.weight = torch.nn.Parameter(torch.ones(2, 4))  # and a new parameter
    ours.update(model, step=11)
    timms.update(model, step=11)
    assert ours._pairs is not first
    same_state(ours.module, timms.module)
    ours.update(model, step=12)  # unchanged model: the lists are kept
    timms.update(model, step=12)
    same_state(ours.module, timms.module)


def test_another_model_object_builds_new_lists():
    torch.manual_seed(0)
    model = Net()
    ours = ModelEma(model, decay=0.5)
    ours.update(model, step=10)
    twin = Net()
    ours.update(twin, step=11)
    assert ours._pairs.model is twin


class SavesADerivedTensor(Net):
    """A module whose state_dict holds a tensor it does not own (its own `_save_to_state_dict`)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scale"] = torch.ones(2) * float(self.head.bias.detach().sum())


def test_a_state_dict_with_tensors_no_module_owns_takes_timms_walk():
    torch.manual_seed(0)
    model = SavesADerivedTensor()
    ours, timms = ModelEma(model, decay=0.5), ModelEmaV3(model, decay=0.5)
    for step in (10, 11):
        train_a_little(model, step)
        ours.update(model, step=step)
        timms.update(model, step=step)
        same_state(ours.module, timms.module)
    assert not ours._pairs.usable
